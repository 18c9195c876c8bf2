package proxy

import (
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"net/netip"
	"syscall"
	"time"

	"go.uber.org/zap"
)

// Peers locates the other replicas that share the budget
// (budget.cluster), so that a CancelRequest reaching the wrong replica
// (several behind one Service) is forwarded to the one that issued the key.
// *cluster.Manager is one.
type Peers interface {
	// ReplicaID is this replica's number, 0 while it has none.
	ReplicaID() int
	// PeerAddr is where cancel requests for replica id's clients go.
	PeerAddr(id int) (string, bool)
}

// In cluster mode a cancel key's process ID carries the issuing replica's
// number in its bits 21 to 30 (bit 31 stays clear: the ID is a positive
// int4 to libpq); the low 21 bits are random, and the 32-bit secret, from
// crypto/rand as always, is what guards the key. A key issued before the
// replica had a number carries 0 and is only known locally.
//
// A forwarded cancel request is a challenge and a response, so that the
// key's secret never crosses the network and only a holder of the shared
// key is obeyed:
//
//	sender → receiver: int32 12, int32 1234.5691, int32 process ID   (a startup packet)
//	receiver → sender: 32 random bytes (the challenge)
//	sender → receiver: int32 36, HMAC-SHA256(key, "pggovernor cancel v1\x00" ‖ challenge ‖ process ID ‖ secret)
//
// The receiver cancels the query of its client with that process ID if the
// MAC matches that client's secret, never forwards it again, and closes.
// Whoever the membership table points the sender at learns a MAC over a
// challenge of its own making, which no replica will accept.
const (
	replicaIDShift = 21
	// MaxReplicaID is the largest replica number a cancel key can carry.
	MaxReplicaID = 1<<(31-replicaIDShift) - 1
	// peerCancelRequestCode marks a cancel request forwarded by a peer
	// replica (1234.5691; Postgres uses 1234.5678 for CancelRequest, and
	// pggovernor used 1234.5690 for the unauthenticated form it no longer
	// accepts).
	peerCancelRequestCode = 1234<<16 | 5691
	peerChallengeLen      = 32
	peerMACLen            = sha256.Size
	peerMACContext        = "pggovernor cancel v1\x00"
	// cancelForwardTimeout bounds forwarding a cancel request to a peer.
	cancelForwardTimeout = 5 * time.Second
)

// Results of forwarding a cancel request (Metrics.CancelForwarded).
const (
	ForwardSent      = "forwarded"       // sent to the replica that issued the key
	ForwardNoMember  = "not_member"      // its replica number is no member's, or it has no address
	ForwardNoSecret  = "no_secret"       // budget.cluster.secret_file is not set
	ForwardRefused   = "address_refused" // its address is outside budget.cluster.peer_cidrs
	ForwardFailed    = "failed"          // the peer could not be reached or broke off
	forwardResultsN  = 5
	ReceivedAccepted = "accepted"  // authenticated: served like a CancelRequest
	ReceivedRefused  = "refused"   // the MAC did not match a client's key
	ReceivedNoSecret = "no_secret" // budget.cluster.secret_file is not set here
	receivedResultsN = 3
)

// CancelForwardResults and CancelReceivedResults list every result, so
// that a counter can start each at zero.
func CancelForwardResults() [forwardResultsN]string {
	return [...]string{ForwardSent, ForwardNoMember, ForwardNoSecret, ForwardRefused, ForwardFailed}
}

// CancelReceivedResults: see CancelForwardResults.
func CancelReceivedResults() [receivedResultsN]string {
	return [...]string{ReceivedAccepted, ReceivedRefused, ReceivedNoSecret}
}

// keyReplica is the replica number a cancel key's process ID carries.
func keyReplica(pid uint32) int { return int(pid >> replicaIDShift) }

// peerMAC authenticates a forwarded cancel request.
func peerMAC(key []byte, challenge []byte, pid, secret uint32) []byte {
	h := hmac.New(sha256.New, key)
	h.Write([]byte(peerMACContext))
	h.Write(challenge)
	var b [8]byte
	binary.BigEndian.PutUint32(b[0:], pid)
	binary.BigEndian.PutUint32(b[4:], secret)
	h.Write(b[:])
	return h.Sum(nil)
}

var errPeerNotAllowed = errors.New("the address is outside budget.cluster.peer_cidrs")

// forwardCancel passes a cancel request for another replica's client to
// it, if the membership knows where it listens and the address is
// allowed, and waits until it has dealt with it (it closes the
// connection), as libpq waits for the server. It reports whether the
// request was for another replica.
func (s *Server) forwardCancel(pid, secret uint32) bool {
	o := &s.opts
	if o.Peers == nil {
		return false
	}
	id := keyReplica(pid)
	if id == 0 || id == o.Peers.ReplicaID() {
		return false
	}
	var key []byte
	if o.PeerSecret != nil {
		key = o.PeerSecret()
	}
	if key == nil {
		s.opts.Metrics.cancelForwarded(ForwardNoSecret)
		s.logger.Debug("cancel request for another replica dropped: budget.cluster.secret_file is not set", zap.Int("replica", id))
		return true
	}
	addr, ok := o.Peers.PeerAddr(id)
	if !ok {
		s.opts.Metrics.cancelForwarded(ForwardNoMember)
		s.logger.Debug("cancel request for a replica that is not a member dropped", zap.Int("replica", id))
		return true
	}
	ctx, cancel := context.WithTimeout(s.stopCtx, cancelForwardTimeout)
	defer cancel()
	d := net.Dialer{Control: func(_, address string, _ syscall.RawConn) error {
		ap, err := netip.ParseAddrPort(address)
		if err != nil || (o.PeerAllowed != nil && !o.PeerAllowed(ap.Addr().WithZone("").Unmap())) {
			return errPeerNotAllowed
		}
		return nil
	}}
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		if errors.Is(err, errPeerNotAllowed) {
			s.opts.Metrics.cancelForwarded(ForwardRefused)
			s.logger.Warn("cancel request for another replica dropped: its address is outside budget.cluster.peer_cidrs", zap.Int("replica", id), zap.String("peer", addr))
			return true
		}
		s.opts.Metrics.cancelForwarded(ForwardFailed)
		s.logger.Warn("forwarding a cancel request to another replica failed", zap.Int("replica", id), zap.String("peer", addr), zap.Error(err))
		return true
	}
	defer c.Close()
	dl, _ := ctx.Deadline()
	_ = c.SetDeadline(dl)
	var hdr [12]byte
	binary.BigEndian.PutUint32(hdr[0:], 12)
	binary.BigEndian.PutUint32(hdr[4:], peerCancelRequestCode)
	binary.BigEndian.PutUint32(hdr[8:], pid)
	challenge := make([]byte, peerChallengeLen)
	msg := make([]byte, 4, 4+peerMACLen)
	binary.BigEndian.PutUint32(msg, 4+peerMACLen)
	err = func() error {
		if _, err := c.Write(hdr[:]); err != nil {
			return err
		}
		if _, err := io.ReadFull(c, challenge); err != nil {
			return err
		}
		_, err := c.Write(append(msg, peerMAC(key, challenge, pid, secret)...))
		return err
	}()
	if err != nil {
		s.opts.Metrics.cancelForwarded(ForwardFailed)
		s.logger.Warn("forwarding a cancel request to another replica failed", zap.Int("replica", id), zap.String("peer", addr), zap.Error(err))
		return true
	}
	_, _ = io.Copy(io.Discard, c) // until the peer closes
	s.opts.Metrics.cancelForwarded(ForwardSent)
	s.logger.Debug("cancel request forwarded to another replica", zap.Int("replica", id), zap.String("peer", addr))
	return true
}

// servePeerCancel answers a cancel request forwarded by a peer (its
// startup packet read): the challenge, then the MAC, checked against the
// secret of the client with process ID pid; on a match the client's query
// is cancelled. Nothing is forwarded again.
func (sess *session) servePeerCancel(pid uint32) {
	s := sess.srv
	var key []byte
	if f := s.opts.PeerSecret; f != nil {
		key = f()
	}
	if key == nil {
		s.opts.Metrics.cancelReceived(ReceivedNoSecret)
		s.opts.Metrics.cancelRequest(CancelDropped)
		s.logger.Warn("a cancel request forwarded by another replica was refused: budget.cluster.secret_file is not set on this replica")
		return
	}
	challenge := make([]byte, peerChallengeLen)
	if _, err := rand.Read(challenge); err != nil {
		return
	}
	if _, err := sess.conn.Write(challenge); err != nil {
		return
	}
	mac, err := sess.rd.ReadStartup()
	target := s.sessionByKey(pid)
	if err != nil || len(mac) != peerMACLen || target == nil || !hmac.Equal(mac, peerMAC(key, challenge, pid, target.key.secret)) {
		// A wrong secret and a wrong key file look the same from here.
		s.opts.Metrics.cancelReceived(ReceivedRefused)
		s.opts.Metrics.cancelRequest(CancelDropped)
		s.logger.Debug("cancel request for an unknown key dropped", zap.Bool("forwarded", true))
		return
	}
	s.opts.Metrics.cancelReceived(ReceivedAccepted)
	s.opts.Metrics.cancelRequest(target.cancelQuery())
}
