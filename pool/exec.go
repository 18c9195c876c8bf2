package pool

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/pggovernor/pggovernor/wire"
)

// Exec runs each query as its own simple Query message on a connection
// the caller holds, and waits for all of them to finish. Parameter changes
// are recorded in s.Params and the final transaction status in s.TxStatus.
// It returns the first error the server reported. If ctx ends first, the
// connection is marked broken. The caller keeps the connection.
func (p *Pool) Exec(ctx context.Context, s *Server, queries ...string) error {
	_, err := p.exec(ctx, s, false, queries...)
	return err
}

// QueryRow runs query on a connection the caller holds, as Exec does, and
// returns the columns of its first row as text (NULL as ""); an error when
// it returned no row.
func (p *Pool) QueryRow(ctx context.Context, s *Server, query string) ([]string, error) {
	row, err := p.exec(ctx, s, true, query)
	if err == nil && row == nil {
		err = errors.New("the query returned no row")
	}
	return row, err
}

func (p *Pool) exec(ctx context.Context, s *Server, wantRow bool, queries ...string) ([]string, error) {
	if len(queries) == 0 {
		return nil, nil
	}
	h := &execHandler{remaining: len(queries), done: make(chan struct{}), wantRow: wantRow}
	s.SetHandler(NewHandlerSlot(h))
	defer s.SetHandler(nil)
	var buf []byte
	for _, q := range queries {
		start := len(buf)
		buf = append(buf, 'Q', 0, 0, 0, 0)
		buf = append(buf, q...)
		buf = append(buf, 0)
		wire.SetLength(buf, start)
	}
	s.writeMu.Lock()
	if dl, ok := ctx.Deadline(); ok {
		_ = s.conn.SetWriteDeadline(dl)
	}
	_, err := s.conn.Write(buf)
	_ = s.conn.SetWriteDeadline(time.Time{})
	s.writeMu.Unlock()
	if err != nil {
		s.MarkBroken()
		return nil, fmt.Errorf("writing to the server: %w", err)
	}
	select {
	case <-h.done:
	case <-ctx.Done():
		s.MarkBroken()
		return nil, fmt.Errorf("waiting for the server: %w", ctx.Err())
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.lost != nil {
		return nil, h.lost
	}
	s.TxStatus = h.status
	for k, v := range h.params {
		s.Params[k] = v
	}
	return h.row, h.err
}

// Reset runs queries (for example DISCARD ALL) on a held connection, then
// releases it: reused when they succeeded and left it idle, closed
// otherwise.
func (p *Pool) Reset(ctx context.Context, s *Server, queries ...string) error {
	err := p.Exec(ctx, s, queries...)
	if err != nil {
		s.MarkBroken()
	}
	p.Release(s)
	return err
}

// execHandler collects the outcome of the pool's own queries.
type execHandler struct {
	mu        sync.Mutex
	remaining int
	status    byte
	err       error
	lost      error
	params    map[string]string
	done      chan struct{}
	finished  bool
	wantRow   bool
	row       []string // the first DataRow, when wantRow
}

func (h *execHandler) ServerMessage(_ *Server, typ byte, data []byte, more int) error {
	if more > 0 {
		return nil // a large row of a query the pool ran: ignored
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	body := data[wire.HeaderLen:]
	switch typ {
	case 'E':
		var er pgproto3.ErrorResponse
		if err := er.Decode(body); err == nil && h.err == nil {
			h.err = pgconn.ErrorResponseToPgError(&er)
		}
	case 'D':
		if h.wantRow && h.row == nil {
			var dr pgproto3.DataRow
			if err := dr.Decode(body); err == nil {
				h.row = make([]string, len(dr.Values))
				for i, v := range dr.Values {
					h.row[i] = string(v)
				}
			}
		}
	case 'S':
		var ps pgproto3.ParameterStatus
		if err := ps.Decode(body); err == nil {
			if h.params == nil {
				h.params = map[string]string{}
			}
			h.params[ps.Name] = ps.Value
		}
	case 'Z':
		if len(body) == 1 {
			h.status = body[0]
		}
		h.remaining--
		if h.remaining == 0 && !h.finished {
			h.finished = true
			close(h.done)
		}
	}
	return nil
}

func (h *execHandler) ServerFlush(*Server) error { return nil }

func (h *execHandler) ServerLost(_ *Server, err error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.finished {
		return
	}
	h.lost = errors.Join(errors.New("server connection lost"), err)
	h.finished = true
	close(h.done)
}
