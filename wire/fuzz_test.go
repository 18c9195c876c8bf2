package wire_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"testing"

	"github.com/pggovernor/pggovernor/wire"
)

// FuzzReader feeds arbitrary bytes through ReadStartup, Header,
// PeekHeader and Frame with a small limit and a small buffer, read in
// chunks whose sizes come from the input too. It checks that nothing
// panics, that every frame has the length and type its header announced,
// that no accepted frame exceeds the limit, and that the Reader never
// returns more bytes than it was given.
func FuzzReader(f *testing.F) {
	// The committed corpus in testdata/fuzz/FuzzReader holds the
	// hand-written seeds; a few more are added here.
	f.Add(byte(0), append(frame('Q', []byte("SELECT 1\x00")), frame('S', nil)...))
	f.Add(byte(1), startup(append([]byte{0, 3, 0, 0}, "user\x00u\x00\x00"...)))
	f.Add(byte(0x12), append(startup([]byte{0x04, 0xd2, 0x16, 0x2f}), frame('p', []byte("pw\x00"))...))
	f.Add(byte(0x20), bytes.Repeat(frame('D', bytes.Repeat([]byte{'x'}, 40)), 3))
	f.Fuzz(func(t *testing.T, mode byte, data []byte) {
		const limit = 64
		sizes := []int{int(mode>>4)%4 + 1, int(mode>>6) + 1, 3}
		src := &chunkReader{r: bytes.NewReader(data), sizes: sizes}
		bufSize := 16
		if mode&2 != 0 {
			bufSize = 5
		}
		rd := wire.NewReader(src, make([]byte, bufSize), limit)
		consumed := 0

		if mode&1 != 0 {
			body, err := rd.ReadStartup()
			if err == nil {
				n := int(binary.BigEndian.Uint32(data))
				if n < 8 || n > wire.MaxStartupLen || len(body) != n-4 || !bytes.Equal(body, data[4:n]) {
					t.Fatalf("ReadStartup returned a %d-byte body for a packet of length %d", len(body), n)
				}
				consumed += n
			} else {
				checkErr(t, err)
				return
			}
		}

		peek := mode&4 != 0
		for i := 0; ; i++ {
			var typ byte
			var n int
			var err error
			if peek {
				var ok bool
				typ, n, ok, err = rd.PeekHeader()
				if err == nil && !ok {
					if rd.Buffered() >= wire.HeaderLen {
						t.Fatalf("PeekHeader not ok with %d bytes buffered", rd.Buffered())
					}
					if err := rd.Fill(); err != nil {
						checkErr(t, err)
						return
					}
					continue
				}
			} else {
				typ, n, err = rd.Header()
			}
			if err != nil {
				checkErr(t, err)
				var fe *wire.FrameError
				if errors.As(err, &fe) {
					want := int64(binary.BigEndian.Uint32(data[consumed+1:]))
					if fe.Length != want || fe.Type != data[consumed] {
						t.Fatalf("FrameError %+v for header %q", *fe, data[consumed:consumed+5])
					}
					if (want > limit) != errors.Is(err, wire.ErrMessageTooLarge) || (want >= 4 && want <= limit) {
						t.Fatalf("FrameError %+v for a length of %d with limit %d", *fe, want, limit)
					}
				}
				return
			}
			if n < wire.HeaderLen || n > limit+1 {
				t.Fatalf("header announced a frame of %d bytes (limit %d)", n, limit)
			}
			fr, err := rd.Frame(n)
			if err != nil {
				checkErr(t, err)
				if consumed+n <= len(data) {
					t.Fatalf("Frame(%d) failed with %v although %d bytes remained", n, err, len(data)-consumed)
				}
				return
			}
			if len(fr) != n || fr[0] != typ || int(binary.BigEndian.Uint32(fr[1:]))+1 != n {
				t.Fatalf("frame %q has length %d, header said type %q length %d", fr, len(fr), typ, n)
			}
			if consumed+n > len(data) || !bytes.Equal(fr, data[consumed:consumed+n]) {
				t.Fatalf("frame %d does not match the input at offset %d", i, consumed)
			}
			consumed += n
			if mode&8 != 0 {
				rd.Shrink()
				if rd.Buffered() == 0 && len(rd.Buffer()) != bufSize {
					t.Fatalf("Shrink left a %d-byte buffer, want %d", len(rd.Buffer()), bufSize)
				}
			}
		}
	})
}

// checkErr fails unless err is one the Reader may return for a bad or
// short input.
func checkErr(t *testing.T, err error) {
	t.Helper()
	var fe *wire.FrameError
	switch {
	case err == io.EOF, err == io.ErrUnexpectedEOF:
	case errors.As(err, &fe):
	default:
		t.Fatalf("unexpected error %v (%T)", err, err)
	}
}
