package proxy

import (
	"context"
	"encoding/binary"
	"io"
	"net"
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
const (
	replicaIDShift = 21
	// MaxReplicaID is the largest replica number a cancel key can carry.
	MaxReplicaID = 1<<(31-replicaIDShift) - 1
	// peerCancelRequestCode marks a CancelRequest forwarded by a peer
	// replica (1234.5690; Postgres uses 1234.5678 for CancelRequest): it is
	// served like one but never forwarded again, so views of the membership
	// that disagree for a moment cannot bounce it between replicas.
	peerCancelRequestCode = 1234<<16 | 5690
	// cancelForwardTimeout bounds forwarding a cancel request to a peer.
	cancelForwardTimeout = 5 * time.Second
)

// keyReplica is the replica number a cancel key's process ID carries.
func keyReplica(pid uint32) int { return int(pid >> replicaIDShift) }

// forwardCancel passes a cancel request for another replica's client to
// it, if the membership knows where it listens, and waits until it has
// dealt with it (it closes the connection), as libpq waits for the server.
// It reports whether the request was for another replica, and whether it
// was passed on.
func (s *Server) forwardCancel(pid, secret uint32) (forwarded, ok bool) {
	peers := s.opts.Peers
	if peers == nil {
		return false, false
	}
	id := keyReplica(pid)
	if id == 0 || id == peers.ReplicaID() {
		return false, false
	}
	addr, ok := peers.PeerAddr(id)
	if !ok {
		s.logger.Debug("cancel request for a replica that is not a member dropped", zap.Int("replica", id))
		return true, false
	}
	ctx, cancel := context.WithTimeout(s.stopCtx, cancelForwardTimeout)
	defer cancel()
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		s.logger.Warn("forwarding a cancel request to another replica failed", zap.Int("replica", id), zap.String("peer", addr), zap.Error(err))
		return true, false
	}
	defer c.Close()
	dl, _ := ctx.Deadline()
	_ = c.SetDeadline(dl)
	var buf [16]byte
	binary.BigEndian.PutUint32(buf[0:], 16)
	binary.BigEndian.PutUint32(buf[4:], peerCancelRequestCode)
	binary.BigEndian.PutUint32(buf[8:], pid)
	binary.BigEndian.PutUint32(buf[12:], secret)
	if _, err := c.Write(buf[:]); err != nil {
		s.logger.Warn("forwarding a cancel request to another replica failed", zap.Int("replica", id), zap.String("peer", addr), zap.Error(err))
		return true, false
	}
	_, _ = io.Copy(io.Discard, c) // until the peer closes
	s.logger.Debug("cancel request forwarded to another replica", zap.Int("replica", id), zap.String("peer", addr))
	return true, true
}
