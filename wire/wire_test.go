package wire_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"runtime"
	"strings"
	"testing"
	"testing/iotest"

	"github.com/pggovernor/pggovernor/wire"
)

// frame builds a regular message: type byte, length, body.
func frame(typ byte, body []byte) []byte {
	return append(wire.AppendHeader(nil, typ, len(body)), body...)
}

// rawHeader builds a five-byte header with an arbitrary length field.
func rawHeader(typ byte, length uint32) []byte {
	b := []byte{typ, 0, 0, 0, 0}
	binary.BigEndian.PutUint32(b[1:], length)
	return b
}

// startup builds an untyped startup packet with the given body.
func startup(body []byte) []byte {
	b := make([]byte, 4, 4+len(body))
	binary.BigEndian.PutUint32(b, uint32(4+len(body)))
	return append(b, body...)
}

// chunkReader returns at most sizes[i%len(sizes)] bytes on its i-th Read.
type chunkReader struct {
	r     io.Reader
	sizes []int
	i     int
}

func (c *chunkReader) Read(p []byte) (int, error) {
	n := c.sizes[c.i%len(c.sizes)]
	c.i++
	if len(p) > n {
		p = p[:n]
	}
	return c.r.Read(p)
}

// countingReader counts Read calls.
type countingReader struct {
	r     io.Reader
	reads int
}

func (c *countingReader) Read(p []byte) (int, error) {
	c.reads++
	return c.r.Read(p)
}

// recordingWriter records every Write call separately.
type recordingWriter struct {
	writes [][]byte
}

func (w *recordingWriter) Write(p []byte) (int, error) {
	w.writes = append(w.writes, append([]byte(nil), p...))
	return len(p), nil
}

func (w *recordingWriter) joined() []byte { return bytes.Join(w.writes, nil) }

type readerCase struct {
	name string
	wrap func(io.Reader) io.Reader
	buf  int // reader buffer size; 0 for the default
}

var readerCases = []readerCase{
	{"whole reads", func(r io.Reader) io.Reader { return r }, 0},
	{"one byte per read", iotest.OneByteReader, 0},
	{"1-2-3 byte chunks", func(r io.Reader) io.Reader { return &chunkReader{r: r, sizes: []int{1, 2, 3}} }, 0},
	{"3-1-2 byte chunks", func(r io.Reader) io.Reader { return &chunkReader{r: r, sizes: []int{3, 1, 2}} }, 0},
	{"half reads", iotest.HalfReader, 0},
	{"data with EOF", iotest.DataErrReader, 0},
	{"one byte per read, 16-byte buffer", iotest.OneByteReader, 16},
	{"1-2-3 byte chunks, 7-byte buffer", func(r io.Reader) io.Reader { return &chunkReader{r: r, sizes: []int{1, 2, 3}} }, 7},
	{"whole reads, 5-byte buffer", func(r io.Reader) io.Reader { return r }, 5},
}

func newReader(rd io.Reader, bufSize, maxLen int) *wire.Reader {
	var buf []byte
	if bufSize > 0 {
		buf = make([]byte, bufSize)
	}
	return wire.NewReader(rd, buf, maxLen)
}

// testFrames is a stream of frames of varied sizes, including an empty
// body and one longer than every small buffer in readerCases.
func testFrames() [][]byte {
	return [][]byte{
		frame('Q', []byte("SELECT 1\x00")),
		frame('S', nil),
		frame('D', []byte{0, 1, 0, 0, 0, 3, 'a', 'b', 'c'}),
		frame('P', append([]byte("stmt\x00SELECT $1\x00"), 0, 0)),
		frame('d', bytes.Repeat([]byte("x"), 100)),
		frame('Z', []byte{'I'}),
	}
}

func TestReaderHeaderFrameAcrossSmallReads(t *testing.T) {
	want := testFrames()
	stream := bytes.Join(want, nil)
	for _, tc := range readerCases {
		t.Run(tc.name, func(t *testing.T) {
			rd := newReader(tc.wrap(bytes.NewReader(stream)), tc.buf, 1<<20)
			for i, w := range want {
				typ, n, err := rd.Header()
				if err != nil {
					t.Fatalf("frame %d: Header: %v", i, err)
				}
				if typ != w[0] || n != len(w) {
					t.Fatalf("frame %d: Header = (%q, %d), want (%q, %d)", i, typ, n, w[0], len(w))
				}
				got, err := rd.Frame(n)
				if err != nil {
					t.Fatalf("frame %d: Frame: %v", i, err)
				}
				if !bytes.Equal(got, w) {
					t.Fatalf("frame %d = %q, want %q", i, got, w)
				}
			}
			if _, _, err := rd.Header(); err != io.EOF {
				t.Fatalf("Header at end of stream: err = %v, want io.EOF", err)
			}
		})
	}
}

// TestReaderPeekHeaderFillLoop drives the Reader the way the proxy's pumps
// do: PeekHeader, Fill while it is not ok, then Frame.
func TestReaderPeekHeaderFillLoop(t *testing.T) {
	want := testFrames()
	stream := bytes.Join(want, nil)
	for _, tc := range readerCases {
		t.Run(tc.name, func(t *testing.T) {
			rd := newReader(tc.wrap(bytes.NewReader(stream)), tc.buf, 1<<20)
			var got [][]byte
			for {
				typ, n, ok, err := rd.PeekHeader()
				if err != nil {
					t.Fatalf("PeekHeader: %v", err)
				}
				if !ok {
					if err := rd.Fill(); err == io.EOF {
						break
					} else if err != nil {
						t.Fatalf("Fill: %v", err)
					}
					continue
				}
				f, err := rd.Frame(n)
				if err != nil {
					t.Fatalf("Frame: %v", err)
				}
				if f[0] != typ || len(f) != n {
					t.Fatalf("Frame(%d) = %q, want type %q and length %d", n, f, typ, n)
				}
				got = append(got, append([]byte(nil), f...))
				rd.Shrink()
			}
			if rd.Buffered() != 0 {
				t.Fatalf("%d bytes left buffered", rd.Buffered())
			}
			if len(got) != len(want) {
				t.Fatalf("got %d frames, want %d", len(got), len(want))
			}
			for i := range want {
				if !bytes.Equal(got[i], want[i]) {
					t.Errorf("frame %d = %q, want %q", i, got[i], want[i])
				}
			}
		})
	}
}

func TestPeekHeaderNeedsFiveBufferedBytes(t *testing.T) {
	f := frame('Q', []byte("x\x00"))
	rd := wire.NewReader(iotest.OneByteReader(bytes.NewReader(f)), nil, 1024)
	for i := 0; i < wire.HeaderLen; i++ {
		if _, _, ok, err := rd.PeekHeader(); ok || err != nil {
			t.Fatalf("with %d bytes buffered: PeekHeader ok = %v, err = %v; want false, nil", i, ok, err)
		}
		if err := rd.Fill(); err != nil {
			t.Fatal(err)
		}
	}
	typ, n, ok, err := rd.PeekHeader()
	if !ok || err != nil || typ != 'Q' || n != len(f) {
		t.Fatalf("PeekHeader = (%q, %d, %v, %v), want ('Q', %d, true, nil)", typ, n, ok, err, len(f))
	}
	if rd.Buffered() != wire.HeaderLen {
		t.Fatalf("PeekHeader consumed bytes: Buffered = %d", rd.Buffered())
	}
}

func TestReaderInvalidLengths(t *testing.T) {
	const limit = 100
	tests := []struct {
		name     string
		length   uint32
		tooLarge bool
	}{
		{"length 0", 0, false},
		{"length 1", 1, false},
		{"length 3", 3, false},
		{"length limit+1", limit + 1, true},
		{"length 0x7fffffff", 0x7fffffff, true},
		{"length 0xffffffff", 0xffffffff, true},
	}
	for _, tc := range tests {
		in := append(rawHeader('Q', tc.length), make([]byte, 16)...)
		check := func(t *testing.T, err error) {
			t.Helper()
			var fe *wire.FrameError
			if !errors.As(err, &fe) {
				t.Fatalf("err = %v (%T), want *wire.FrameError", err, err)
			}
			if fe.Type != 'Q' || fe.Length != int64(tc.length) || fe.Limit != limit {
				t.Errorf("FrameError = %+v, want Type 'Q', Length %d, Limit %d", *fe, tc.length, limit)
			}
			if got := errors.Is(err, wire.ErrMessageTooLarge); got != tc.tooLarge {
				t.Errorf("errors.Is(err, ErrMessageTooLarge) = %v, want %v", got, tc.tooLarge)
			}
			if fe.Error() == "" {
				t.Error("empty error message")
			}
		}
		t.Run("Header/"+tc.name, func(t *testing.T) {
			rd := wire.NewReader(iotest.OneByteReader(bytes.NewReader(in)), nil, limit)
			_, n, err := rd.Header()
			if n != 0 {
				t.Errorf("frame length = %d, want 0 on error", n)
			}
			check(t, err)
		})
		t.Run("PeekHeader/"+tc.name, func(t *testing.T) {
			rd := wire.NewReader(bytes.NewReader(in), nil, limit)
			if err := rd.Fill(); err != nil {
				t.Fatal(err)
			}
			_, n, ok, err := rd.PeekHeader()
			if ok || n != 0 {
				t.Errorf("PeekHeader ok = %v, n = %d; want false, 0 on error", ok, n)
			}
			check(t, err)
		})
	}
}

func TestReaderLengthAtLimitAccepted(t *testing.T) {
	const limit = 64
	f := frame('Q', make([]byte, limit-4)) // length field == limit
	rd := wire.NewReader(bytes.NewReader(f), make([]byte, 16), limit)
	typ, n, err := rd.Header()
	if err != nil || typ != 'Q' || n != limit+1 {
		t.Fatalf("Header = (%q, %d, %v), want ('Q', %d, nil)", typ, n, err, limit+1)
	}
	got, err := rd.Frame(n)
	if err != nil || !bytes.Equal(got, f) {
		t.Fatalf("Frame = (%q, %v), want (%q, nil)", got, err, f)
	}
}

func TestReaderSetMaxLen(t *testing.T) {
	f := frame('Q', make([]byte, 20)) // length 24
	rd := wire.NewReader(bytes.NewReader(bytes.Repeat(f, 2)), nil, 1000)
	if _, n, err := rd.Header(); err != nil {
		t.Fatal(err)
	} else if _, err := rd.Frame(n); err != nil {
		t.Fatal(err)
	}
	rd.SetMaxLen(23)
	if _, _, err := rd.Header(); !errors.Is(err, wire.ErrMessageTooLarge) {
		t.Fatalf("after SetMaxLen(23): err = %v, want ErrMessageTooLarge", err)
	}
}

func TestReadStartup(t *testing.T) {
	ssl := startup([]byte{0x04, 0xd2, 0x16, 0x2f}) // SSLRequest
	params := append([]byte{0, 3, 0, 0}, "user\x00bob\x00database\x00db\x00\x00"...)
	msg := startup(params)
	big := startup(make([]byte, wire.MaxStartupLen-4)) // exactly the maximum
	tests := []struct {
		name    string
		in      []byte
		want    []byte // body after the length; nil for an error
		wantLen int64  // Length in the FrameError
	}{
		{"SSLRequest", ssl, ssl[4:], 0},
		{"StartupMessage", msg, params, 0},
		{"minimum length 8", startup(make([]byte, 4)), make([]byte, 4), 0},
		{"maximum length", big, big[4:], 0},
		{"length 0", []byte{0, 0, 0, 0, 1, 2, 3, 4}, nil, 0},
		{"length 4", []byte{0, 0, 0, 4, 1, 2, 3, 4}, nil, 4},
		{"length 7", []byte{0, 0, 0, 7, 1, 2, 3, 4}, nil, 7},
		{"length 10001", append([]byte{0, 0, 0x27, 0x11}, make([]byte, 16)...), nil, 10001},
		{"length 0xffffffff", []byte{0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0}, nil, 0xffffffff},
	}
	for _, tc := range tests {
		for _, rc := range readerCases[:3] {
			t.Run(tc.name+"/"+rc.name, func(t *testing.T) {
				rd := wire.NewReader(rc.wrap(bytes.NewReader(tc.in)), nil, 100)
				body, err := rd.ReadStartup()
				if tc.want == nil {
					var fe *wire.FrameError
					if !errors.As(err, &fe) {
						t.Fatalf("err = %v (%T), want *wire.FrameError", err, err)
					}
					if fe.Length != tc.wantLen || fe.Limit != wire.MaxStartupLen {
						t.Errorf("FrameError = %+v, want Length %d, Limit %d", *fe, tc.wantLen, wire.MaxStartupLen)
					}
					return
				}
				if err != nil {
					t.Fatalf("ReadStartup: %v", err)
				}
				if !bytes.Equal(body, tc.want) {
					t.Fatalf("body = %q, want %q", body, tc.want)
				}
			})
		}
	}
}

// TestReadStartupThenRegularFrames checks the phase change on one Reader:
// an SSLRequest and a StartupMessage arriving in the same read as the first
// regular message.
func TestReadStartupThenRegularFrames(t *testing.T) {
	ssl := startup([]byte{0x04, 0xd2, 0x16, 0x2f})
	msg := startup(append([]byte{0, 3, 0, 0}, "user\x00u\x00\x00"...))
	pw := frame('p', []byte("secret\x00"))
	rd := wire.NewReader(bytes.NewReader(bytes.Join([][]byte{ssl, msg, pw}, nil)), nil, 1000)
	for _, want := range [][]byte{ssl, msg} {
		body, err := rd.ReadStartup()
		if err != nil || !bytes.Equal(body, want[4:]) {
			t.Fatalf("ReadStartup = (%q, %v), want (%q, nil)", body, err, want[4:])
		}
	}
	_, n, err := rd.Header()
	if err != nil {
		t.Fatal(err)
	}
	got, err := rd.Frame(n)
	if err != nil || !bytes.Equal(got, pw) {
		t.Fatalf("Frame = (%q, %v), want (%q, nil)", got, err, pw)
	}
}

func TestReaderEOFMidFrame(t *testing.T) {
	f := frame('Q', []byte("SELECT 1\x00"))
	for cut := wire.HeaderLen; cut < len(f); cut++ {
		for _, rc := range readerCases {
			rd := newReader(rc.wrap(bytes.NewReader(f[:cut])), rc.buf, 1000)
			_, n, err := rd.Header()
			if err != nil {
				t.Fatalf("cut %d, %s: Header: %v", cut, rc.name, err)
			}
			if _, err := rd.Frame(n); err != io.ErrUnexpectedEOF {
				t.Errorf("cut %d, %s: Frame err = %v, want io.ErrUnexpectedEOF", cut, rc.name, err)
			}
		}
	}
}

func TestReadStartupEOFMidPacket(t *testing.T) {
	p := startup(append([]byte{0, 3, 0, 0}, "user\x00u\x00\x00"...))
	for cut := 4; cut < len(p); cut++ {
		rd := wire.NewReader(iotest.OneByteReader(bytes.NewReader(p[:cut])), nil, 1000)
		if _, err := rd.ReadStartup(); err != io.ErrUnexpectedEOF {
			t.Errorf("cut %d: err = %v, want io.ErrUnexpectedEOF", cut, err)
		}
	}
}

// TestReaderEOFMidHeader pins down today's behaviour: a stream that ends
// inside a five-byte header (or a four-byte startup length) reports an
// error, but it is plain io.EOF rather than io.ErrUnexpectedEOF, so callers
// cannot tell a clean disconnect from a truncated header.
func TestReaderEOFMidHeader(t *testing.T) {
	f := frame('Q', []byte("SELECT 1\x00"))
	for cut := 0; cut < wire.HeaderLen; cut++ {
		rd := wire.NewReader(iotest.OneByteReader(bytes.NewReader(f[:cut])), nil, 1000)
		_, _, err := rd.Header()
		if err == nil {
			t.Fatalf("cut %d: Header succeeded", cut)
		}
		if !errors.Is(err, io.EOF) && !errors.Is(err, io.ErrUnexpectedEOF) {
			t.Errorf("cut %d: Header err = %v, want an EOF", cut, err)
		}
		if cut == 0 && err != io.EOF {
			t.Errorf("empty stream: Header err = %v, want io.EOF", err)
		}
	}
	for cut := 0; cut < 4; cut++ {
		rd := wire.NewReader(bytes.NewReader([]byte{0, 0, 0, 8}[:cut]), nil, 1000)
		if _, err := rd.ReadStartup(); !errors.Is(err, io.EOF) && !errors.Is(err, io.ErrUnexpectedEOF) {
			t.Errorf("cut %d: ReadStartup err = %v, want an EOF", cut, err)
		}
	}
}

func TestReaderReadErrorPassesThrough(t *testing.T) {
	boom := errors.New("boom")
	f := frame('Q', []byte("SELECT 1\x00"))
	rd := wire.NewReader(io.MultiReader(bytes.NewReader(f[:7]), iotest.ErrReader(boom)), nil, 1000)
	_, n, err := rd.Header()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := rd.Frame(n); !errors.Is(err, boom) {
		t.Fatalf("Frame err = %v, want %v", err, boom)
	}
	rd.Reset(iotest.ErrReader(boom))
	if _, _, err := rd.Header(); !errors.Is(err, boom) {
		t.Fatalf("Header err = %v, want %v", err, boom)
	}
}

// zeroReader returns (0, nil) forever.
type zeroReader struct{}

func (zeroReader) Read([]byte) (int, error) { return 0, nil }

func TestFillReportsNoProgress(t *testing.T) {
	rd := wire.NewReader(zeroReader{}, nil, 1000)
	if err := rd.Fill(); err != io.ErrNoProgress {
		t.Fatalf("Fill err = %v, want io.ErrNoProgress", err)
	}
}

func TestFillOnFullBufferFails(t *testing.T) {
	rd := wire.NewReader(bytes.NewReader(make([]byte, 32)), make([]byte, 8), 1000)
	if err := rd.Fill(); err != nil {
		t.Fatal(err)
	}
	if rd.Buffered() != 8 {
		t.Fatalf("Buffered = %d, want 8", rd.Buffered())
	}
	if err := rd.Fill(); err == nil {
		t.Fatal("Fill on a full buffer succeeded")
	}
	// Discarding makes room again: Fill moves the rest to the front.
	rd.Discard(3)
	if err := rd.Fill(); err != nil {
		t.Fatalf("Fill after Discard: %v", err)
	}
	if rd.Buffered() != 8 {
		t.Fatalf("Buffered = %d, want 8", rd.Buffered())
	}
}

func TestFrameGrowsBufferAndShrinkRestoresIt(t *testing.T) {
	const base = 64
	bigBody := bytes.Repeat([]byte("0123456789"), 100)
	big := frame('D', bigBody)
	small := frame('Z', []byte{'I'})
	for _, rc := range readerCases[:3] {
		t.Run(rc.name, func(t *testing.T) {
			rd := wire.NewReader(rc.wrap(bytes.NewReader(bytes.Join([][]byte{small, big, small}, nil))), make([]byte, base), 1<<20)
			read := func(want []byte) {
				t.Helper()
				_, n, err := rd.Header()
				if err != nil {
					t.Fatal(err)
				}
				got, err := rd.Frame(n)
				if err != nil || !bytes.Equal(got, want) {
					t.Fatalf("Frame = (%d bytes, %v), want %d bytes", len(got), err, len(want))
				}
			}
			read(small)
			read(big)
			if got := len(rd.Buffer()); got < len(big) {
				t.Fatalf("buffer is %d bytes after a %d-byte frame", got, len(big))
			}
			rd.Shrink()
			if got := len(rd.Buffer()); got != base {
				t.Fatalf("after Shrink buffer is %d bytes, want %d", got, base)
			}
			read(small)
			rd.Shrink()
			if got := len(rd.Buffer()); got != base {
				t.Fatalf("buffer is %d bytes, want %d", got, base)
			}
		})
	}
}

func TestShrinkKeepsUnreadBytes(t *testing.T) {
	big := frame('D', make([]byte, 100))
	small := frame('Z', []byte{'I'})
	rd := wire.NewReader(bytes.NewReader(append(append([]byte(nil), big...), small...)), make([]byte, 16), 1000)
	if err := rd.Ensure(len(big) + len(small)); err != nil { // grow to hold both
		t.Fatal(err)
	}
	if _, err := rd.Frame(len(big)); err != nil {
		t.Fatal(err)
	}
	grown := len(rd.Buffer())
	rd.Shrink() // small is still unread: must not drop it
	if len(rd.Buffer()) != grown {
		t.Fatalf("Shrink with %d unread bytes resized the buffer to %d", rd.Buffered(), len(rd.Buffer()))
	}
	got, err := rd.Frame(len(small))
	if err != nil || !bytes.Equal(got, small) {
		t.Fatalf("Frame = (%q, %v), want %q", got, err, small)
	}
	rd.Shrink()
	if len(rd.Buffer()) != 16 {
		t.Fatalf("buffer is %d bytes after Shrink, want 16", len(rd.Buffer()))
	}
}

func TestShrinkDoesNothingForBaseBuffer(t *testing.T) {
	buf := make([]byte, 32)
	rd := wire.NewReader(bytes.NewReader(nil), buf, 1000)
	rd.Shrink()
	if &rd.Buffer()[0] != &buf[0] {
		t.Fatal("Shrink replaced a buffer that was never grown")
	}
}

func TestStreamCopiesExactlyNBytesWithoutGrowing(t *testing.T) {
	const bufSize = 16
	for _, n := range []int{0, 1, 15, 16, 17, 100, 1000} {
		for _, rc := range readerCases[:4] {
			// A large DataRow is streamed after its header has been
			// peeked; the frame is followed by a trailing frame that
			// must stay unread.
			body := make([]byte, n)
			for i := range body {
				body[i] = byte(i * 7)
			}
			big := frame('D', body)
			tail := frame('Z', []byte{'I'})
			src := &countingReader{r: rc.wrap(bytes.NewReader(append(append([]byte(nil), big...), tail...)))}
			buf := make([]byte, bufSize)
			rd := wire.NewReader(src, buf, 1<<20)
			_, fl, err := rd.Header()
			if err != nil {
				t.Fatal(err)
			}
			var out recordingWriter
			if err := rd.Stream(&out, fl); err != nil {
				t.Fatalf("n=%d %s: Stream: %v", n, rc.name, err)
			}
			if !bytes.Equal(out.joined(), big) {
				t.Fatalf("n=%d %s: streamed %d bytes, want the %d-byte frame", n, rc.name, len(out.joined()), len(big))
			}
			for _, w := range out.writes {
				if len(w) > bufSize {
					t.Fatalf("n=%d %s: a %d-byte write from a %d-byte buffer", n, rc.name, len(w), bufSize)
				}
			}
			if len(rd.Buffer()) != bufSize || &rd.Buffer()[0] != &buf[0] {
				t.Fatalf("n=%d %s: Stream replaced or grew the buffer (now %d bytes)", n, rc.name, len(rd.Buffer()))
			}
			_, tl, err := rd.Header()
			if err != nil {
				t.Fatalf("n=%d %s: Header after Stream: %v", n, rc.name, err)
			}
			got, err := rd.Frame(tl)
			if err != nil || !bytes.Equal(got, tail) {
				t.Fatalf("n=%d %s: frame after Stream = (%q, %v), want %q", n, rc.name, got, err, tail)
			}
		}
	}
}

func TestStreamToNilDiscards(t *testing.T) {
	big := frame('d', make([]byte, 500))
	tail := frame('c', nil)
	rd := wire.NewReader(iotest.HalfReader(bytes.NewReader(append(append([]byte(nil), big...), tail...))), make([]byte, 32), 1<<20)
	if err := rd.Stream(nil, len(big)); err != nil {
		t.Fatal(err)
	}
	typ, n, err := rd.Header()
	if err != nil || typ != 'c' || n != len(tail) {
		t.Fatalf("Header after discarding Stream = (%q, %d, %v), want ('c', %d, nil)", typ, n, err, len(tail))
	}
}

func TestStreamEOFAndWriteErrors(t *testing.T) {
	rd := wire.NewReader(bytes.NewReader(make([]byte, 50)), make([]byte, 16), 1000)
	if err := rd.Stream(io.Discard, 51); err != io.ErrUnexpectedEOF {
		t.Fatalf("Stream past the end: err = %v, want io.ErrUnexpectedEOF", err)
	}
	boom := errors.New("boom")
	rd = wire.NewReader(bytes.NewReader(make([]byte, 50)), make([]byte, 16), 1000)
	if err := rd.Stream(errWriter{boom}, 50); !errors.Is(err, boom) {
		t.Fatalf("Stream into a failing writer: err = %v, want %v", err, boom)
	}
}

type errWriter struct{ err error }

func (w errWriter) Write([]byte) (int, error) { return 0, w.err }

func TestReaderResetDropsBufferedBytes(t *testing.T) {
	rd := wire.NewReader(bytes.NewReader(frame('Q', []byte("a\x00"))), nil, 1000)
	if err := rd.Fill(); err != nil {
		t.Fatal(err)
	}
	want := frame('S', nil)
	rd.Reset(bytes.NewReader(want))
	if rd.Buffered() != 0 {
		t.Fatalf("Buffered after Reset = %d", rd.Buffered())
	}
	_, n, err := rd.Header()
	if err != nil {
		t.Fatal(err)
	}
	if got, err := rd.Frame(n); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("Frame = (%q, %v), want %q", got, err, want)
	}
}

func TestReaderBytesAndDiscard(t *testing.T) {
	rd := wire.NewReader(bytes.NewReader([]byte("abcdef")), nil, 1000)
	if err := rd.Fill(); err != nil {
		t.Fatal(err)
	}
	if got := string(rd.Bytes()); got != "abcdef" {
		t.Fatalf("Bytes = %q", got)
	}
	rd.Discard(2)
	if got := string(rd.Bytes()); got != "cdef" || rd.Buffered() != 4 {
		t.Fatalf("after Discard(2): Bytes = %q, Buffered = %d", got, rd.Buffered())
	}
	if err := rd.Ensure(4); err != nil {
		t.Fatal(err)
	}
	if err := rd.Ensure(5); err != io.ErrUnexpectedEOF {
		t.Fatalf("Ensure beyond the data: err = %v, want io.ErrUnexpectedEOF", err)
	}
}

func TestWriterCoalescesSmallWrites(t *testing.T) {
	var rec recordingWriter
	w := wire.NewWriter(&rec, make([]byte, 0, 64))
	frames := [][]byte{frame('1', nil), frame('2', nil), frame('D', []byte("row")), frame('C', []byte("SELECT 1\x00")), frame('Z', []byte{'I'})}
	for _, f := range frames {
		n, err := w.Write(f)
		if err != nil || n != len(f) {
			t.Fatalf("Write = (%d, %v), want (%d, nil)", n, err, len(f))
		}
	}
	if len(rec.writes) != 0 {
		t.Fatalf("%d writes before Flush, want 0", len(rec.writes))
	}
	want := bytes.Join(frames, nil)
	if w.Buffered() != len(want) {
		t.Fatalf("Buffered = %d, want %d", w.Buffered(), len(want))
	}
	if err := w.Flush(); err != nil {
		t.Fatal(err)
	}
	if len(rec.writes) != 1 || !bytes.Equal(rec.writes[0], want) {
		t.Fatalf("writes = %q, want one write %q", rec.writes, want)
	}
	if w.Buffered() != 0 {
		t.Fatalf("Buffered after Flush = %d", w.Buffered())
	}
	if err := w.Flush(); err != nil || len(rec.writes) != 1 {
		t.Fatalf("empty Flush: err = %v, %d writes; want nil, 1", err, len(rec.writes))
	}
}

func TestWriterFlushesWhenFull(t *testing.T) {
	var rec recordingWriter
	w := wire.NewWriter(&rec, make([]byte, 0, 16))
	a, b := bytes.Repeat([]byte("a"), 10), bytes.Repeat([]byte("b"), 10)
	if _, err := w.Write(a); err != nil {
		t.Fatal(err)
	}
	if _, err := w.Write(b); err != nil { // does not fit: a is flushed first
		t.Fatal(err)
	}
	if len(rec.writes) != 1 || !bytes.Equal(rec.writes[0], a) {
		t.Fatalf("writes = %q, want [%q]", rec.writes, a)
	}
	if err := w.Flush(); err != nil {
		t.Fatal(err)
	}
	if len(rec.writes) != 2 || !bytes.Equal(rec.writes[1], b) {
		t.Fatalf("writes = %q, want [%q %q]", rec.writes, a, b)
	}
	// Exactly filling the buffer does not flush.
	if _, err := w.Write(bytes.Repeat([]byte("c"), 16)); err != nil {
		t.Fatal(err)
	}
	if len(rec.writes) != 2 || w.Buffered() != 16 {
		t.Fatalf("after a buffer-sized write: %d writes, %d buffered; want 2, 16", len(rec.writes), w.Buffered())
	}
}

func TestWriterPassesLargeWriteStraightThrough(t *testing.T) {
	var rec recordingWriter
	buf := make([]byte, 0, 16)
	w := wire.NewWriter(&rec, buf)
	small := []byte("small")
	large := bytes.Repeat([]byte("L"), 100)
	if _, err := w.Write(small); err != nil {
		t.Fatal(err)
	}
	n, err := w.Write(large)
	if err != nil || n != len(large) {
		t.Fatalf("Write(large) = (%d, %v)", n, err)
	}
	// The buffered bytes go first, then the large write in one call.
	if len(rec.writes) != 2 || !bytes.Equal(rec.writes[0], small) || !bytes.Equal(rec.writes[1], large) {
		t.Fatalf("writes = %d calls, want [small, large]", len(rec.writes))
	}
	if w.Buffered() != 0 || cap(w.Buffer()) != 16 {
		t.Fatalf("Buffered = %d, cap = %d; want 0, 16", w.Buffered(), cap(w.Buffer()))
	}
	// With nothing buffered a large write is a single call.
	if _, err := w.Write(large); err != nil {
		t.Fatal(err)
	}
	if len(rec.writes) != 3 {
		t.Fatalf("%d writes, want 3", len(rec.writes))
	}
}

func TestWriterErrors(t *testing.T) {
	boom := errors.New("boom")
	w := wire.NewWriter(errWriter{boom}, make([]byte, 0, 8))
	if _, err := w.Write([]byte("abc")); err != nil {
		t.Fatalf("buffered Write failed early: %v", err)
	}
	if _, err := w.Write([]byte("defghi")); !errors.Is(err, boom) {
		t.Fatalf("Write that flushes: err = %v, want %v", err, boom)
	}
	if _, err := w.Write(make([]byte, 9)); !errors.Is(err, boom) {
		t.Fatalf("pass-through Write: err = %v, want %v", err, boom)
	}
	if _, err := w.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	if err := w.Flush(); !errors.Is(err, boom) {
		t.Fatalf("Flush err = %v, want %v", err, boom)
	}
	if w.Buffered() != 0 {
		t.Fatalf("Buffered after failed Flush = %d, want 0", w.Buffered())
	}
}

func TestWriterResetDropsBufferedBytes(t *testing.T) {
	var a, b recordingWriter
	w := wire.NewWriter(&a, nil)
	if cap(w.Buffer()) != wire.BufferSize {
		t.Fatalf("default buffer capacity = %d, want %d", cap(w.Buffer()), wire.BufferSize)
	}
	_, _ = w.Write([]byte("dropped"))
	w.Reset(&b)
	_, _ = w.Write([]byte("kept"))
	if err := w.Flush(); err != nil {
		t.Fatal(err)
	}
	if len(a.writes) != 0 || string(b.joined()) != "kept" {
		t.Fatalf("old writer got %q, new writer got %q; want nothing and \"kept\"", a.joined(), b.joined())
	}
}

func TestAppendHeaderAndSetLength(t *testing.T) {
	got := wire.AppendHeader([]byte("prefix"), 'Q', 9)
	want := append([]byte("prefix"), 'Q', 0, 0, 0, 13)
	if !bytes.Equal(got, want) {
		t.Fatalf("AppendHeader = %v, want %v", got, want)
	}
	got = wire.AppendHeader(nil, 'D', 0x01020304-4)
	if !bytes.Equal(got, []byte{'D', 1, 2, 3, 4}) {
		t.Fatalf("AppendHeader big = %v", got)
	}

	// Build a frame with a placeholder length and patch it.
	dst := []byte("xx")
	start := len(dst)
	dst = wire.AppendHeader(dst, 'C', 0)
	dst = append(dst, "SELECT 42\x00"...)
	wire.SetLength(dst, start)
	rd := wire.NewReader(bytes.NewReader(dst[start:]), nil, 1000)
	typ, n, err := rd.Header()
	if err != nil || typ != 'C' || n != len(dst)-start {
		t.Fatalf("Header of patched frame = (%q, %d, %v), want ('C', %d, nil)", typ, n, err, len(dst)-start)
	}
	if l := binary.BigEndian.Uint32(dst[start+1:]); l != 4+10 {
		t.Fatalf("length field = %d, want 14", l)
	}
}

func TestCString(t *testing.T) {
	tests := []struct {
		in      string
		s, rest string
		ok      bool
	}{
		{"abc\x00def", "abc", "def", true},
		{"\x00", "", "", true},
		{"a\x00b\x00", "a", "b\x00", true},
		{"", "", "", false},
		{"no terminator", "", "", false},
	}
	for _, tc := range tests {
		s, rest, ok := wire.CString([]byte(tc.in))
		if ok != tc.ok || string(s) != tc.s || string(rest) != tc.rest {
			t.Errorf("CString(%q) = (%q, %q, %v), want (%q, %q, %v)", tc.in, s, rest, ok, tc.s, tc.rest, tc.ok)
		}
	}
}

func TestFrameErrorMessages(t *testing.T) {
	tooLarge := &wire.FrameError{Type: 'Q', Length: 2000, Limit: 1000, Err: wire.ErrMessageTooLarge}
	if msg := tooLarge.Error(); !strings.Contains(msg, "2000") || !strings.Contains(msg, "1000") {
		t.Errorf("too-large message %q lacks the length or the limit", msg)
	}
	invalid := &wire.FrameError{Type: 'Q', Length: 3, Err: errors.New("length below 4")}
	if msg := invalid.Error(); !strings.Contains(msg, "3") {
		t.Errorf("invalid-length message %q lacks the length", msg)
	}
	if errors.Is(invalid, wire.ErrMessageTooLarge) {
		t.Error("a short length is reported as too large")
	}
}

// roundTripInput is a DataRow followed by ReadyForQuery, as a server sends
// at the end of a one-row pgbench SELECT.
var roundTripInput = bytes.Join([][]byte{
	frame('D', []byte{0, 1, 0, 0, 0, 4, '1', '2', '3', '4'}),
	frame('Z', []byte{'I'}),
}, nil)

// relayPair reads the DataRow+ReadyForQuery pair from rd with PeekHeader,
// Fill and Frame, and writes both through w.
func relayPair(rd *wire.Reader, w *wire.Writer) error {
	for frames := 0; frames < 2; {
		_, n, ok, err := rd.PeekHeader()
		if err != nil {
			return err
		}
		if !ok {
			if err := rd.Fill(); err != nil {
				return err
			}
			continue
		}
		f, err := rd.Frame(n)
		if err != nil {
			return err
		}
		if _, err := w.Write(f); err != nil {
			return err
		}
		frames++
	}
	return w.Flush()
}

func TestReaderWriterRoundTripDoesNotAllocate(t *testing.T) {
	src := bytes.NewReader(roundTripInput)
	rd := wire.NewReader(src, nil, 1<<20)
	w := wire.NewWriter(io.Discard, nil)
	var failed error
	allocs := testing.AllocsPerRun(1000, func() {
		src.Reset(roundTripInput)
		rd.Reset(src)
		if err := relayPair(rd, w); err != nil && failed == nil {
			failed = err
		}
	})
	if failed != nil {
		t.Fatal(failed)
	}
	if allocs != 0 {
		t.Fatalf("reading and relaying a DataRow+ReadyForQuery allocates %v times per run, want 0", allocs)
	}

	// The same through a recording writer, to check the path really relays
	// the bytes in one write.
	var rec recordingWriter
	w.Reset(&rec)
	src.Reset(roundTripInput)
	rd.Reset(src)
	if err := relayPair(rd, w); err != nil {
		t.Fatal(err)
	}
	if len(rec.writes) != 1 || !bytes.Equal(rec.writes[0], roundTripInput) {
		t.Fatalf("relayed %q in %d writes, want %q in one", rec.joined(), len(rec.writes), roundTripInput)
	}
}

func BenchmarkReaderWriterRoundTrip(b *testing.B) {
	src := bytes.NewReader(roundTripInput)
	rd := wire.NewReader(src, nil, 1<<20)
	w := wire.NewWriter(io.Discard, nil)
	b.ReportAllocs()
	b.SetBytes(int64(len(roundTripInput)))
	for b.Loop() {
		src.Reset(roundTripInput)
		rd.Reset(src)
		if err := relayPair(rd, w); err != nil {
			b.Fatal(err)
		}
	}
}

// TestPooledReaderWriterRelease: a pooled Reader and Writer hold no buffer
// once released, borrow one when data comes, and keep the bytes intact.
func TestPooledReaderWriterRelease(t *testing.T) {
	var pool wire.Pool
	frame := wire.AppendHeader(nil, 'Q', 9)
	frame = append(append(frame, "SELECT 1"...), 0)
	big := wire.AppendHeader(nil, 'D', 1000)
	big = append(big, make([]byte, 1000)...)
	r := wire.NewPooledReader(bytes.NewReader(append(append([]byte(nil), frame...), big...)), &pool, 1<<20)
	r.Release()
	if r.Buffer() != nil {
		t.Fatal("want = no buffer after Release, got one")
	}
	typ, n, err := r.Header()
	if err != nil || typ != 'Q' || n != len(frame) {
		t.Fatalf("first frame: want = Q %d, got = %q %d (%v)", len(frame), typ, n, err)
	}
	got, err := r.Frame(n)
	if err != nil || !bytes.Equal(got, frame) {
		t.Fatalf("want = %q, got = %q (%v)", frame, got, err)
	}
	r.Release() // bytes of the next frame are buffered: kept
	typ, n, err = r.Header()
	if err != nil || typ != 'D' || n != len(big) {
		t.Fatalf("second frame: want = D %d, got = %q %d (%v)", len(big), typ, n, err)
	}
	var out bytes.Buffer
	w := wire.NewPooledWriter(&out, &pool)
	if _, err := w.Write(frame); err != nil || w.Flush() != nil {
		t.Fatal(err)
	}
	w.Release()
	if w.Buffer() != nil {
		t.Fatal("want = no buffer after Release, got one")
	}
	if _, err := w.WriteString("x"); err != nil || w.Flush() != nil || out.String() != string(frame)+"x" {
		t.Fatalf("want = %q, got = %q", string(frame)+"x", out.String())
	}
}

// TestReaderPrepend: bytes put back come out first, then what was still
// buffered, then the rest of the stream — in a buffer that fits them and in
// one that must grow.
func TestReaderPrepend(t *testing.T) {
	for _, size := range []int{64, 8} {
		a, b, c := frame('Q', []byte("first\x00")), frame('Q', []byte("second\x00")), frame('S', nil)
		rd := wire.NewReader(bytes.NewReader(append(append([]byte{}, b...), c...)), make([]byte, max(size, len(b))), 1<<20)
		if err := rd.Ensure(len(b)); err != nil {
			t.Fatal(err)
		}
		got, _ := rd.Frame(len(b)) // read b, then put a and b back
		back := append(append([]byte{}, a...), got...)
		rd.Prepend(back)
		for i, w := range [][]byte{a, b, c} {
			_, n, err := rd.Header()
			if err != nil {
				t.Fatalf("size %d, frame %d: %v", size, i, err)
			}
			f, err := rd.Frame(n)
			if err != nil || !bytes.Equal(f, w) {
				t.Fatalf("size %d, frame %d: want = %q, got = %q (%v)", size, i, w, f, err)
			}
		}
	}
}

// growthSource serves a frame's bytes in chunks and records, at every Read,
// how many bytes had arrived before it and how large the Reader's buffer
// was then (what was already in it plus the room offered).
type growthSource struct {
	data    []byte
	chunk   int
	off     int
	arrived []int
	bufLen  []int
}

func (g *growthSource) Read(p []byte) (int, error) {
	if g.off == len(g.data) {
		return 0, io.EOF
	}
	g.arrived = append(g.arrived, g.off)
	g.bufLen = append(g.bufLen, g.off+len(p)) // nothing consumed: the buffer holds all that arrived
	n := copy(p, g.data[g.off:min(len(g.data), g.off+g.chunk)])
	g.off += n
	return n, nil
}

// TestEnsureGrowsWithArrivedBytes: the buffer grows with the bytes that
// arrived — never to more than twice them (or the base size) — and not to
// the length the header announces.
func TestEnsureGrowsWithArrivedBytes(t *testing.T) {
	const base = 8192
	body := bytes.Repeat([]byte("x"), 1<<20)
	msg := frame('Q', body)
	src := &growthSource{data: msg, chunk: 3000}
	rd := wire.NewReader(src, make([]byte, base), 1<<30)
	_, n, err := rd.Header()
	if err != nil {
		t.Fatal(err)
	}
	got, err := rd.Frame(n)
	if err != nil || !bytes.Equal(got, msg) {
		t.Fatalf("Frame = (%d bytes, %v), want the %d-byte frame", len(got), err, len(msg))
	}
	for i, size := range src.bufLen {
		if limit := max(base, 2*src.arrived[i]); size > limit {
			t.Fatalf("read %d: buffer of %d bytes with %d arrived, want at most %d", i, size, src.arrived[i], limit)
		}
	}
	if len(rd.Buffer()) > len(msg) {
		t.Fatalf("buffer of %d bytes for a %d-byte frame", len(rd.Buffer()), len(msg))
	}

	// A header announcing 1 GiB followed by a few bytes, then nothing:
	// the buffer stays at its base size and almost nothing is allocated.
	announce := append(rawHeader('Q', 1<<30), "SELECT"...)
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	rd = wire.NewReader(bytes.NewReader(announce), make([]byte, base), 1<<30+1)
	_, n, err = rd.Header()
	if err != nil {
		t.Fatal(err)
	}
	if err := rd.Ensure(n); !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Fatalf("Ensure of an announced 1 GiB frame with no body: want = io.ErrUnexpectedEOF, got = %v", err)
	}
	runtime.ReadMemStats(&after)
	if len(rd.Buffer()) != base {
		t.Fatalf("buffer grew to %d bytes for a header with no body", len(rd.Buffer()))
	}
	if alloc := after.TotalAlloc - before.TotalAlloc; alloc > 1<<20 {
		t.Fatalf("a header announcing 1 GiB allocated %d bytes", alloc)
	}
}

// TestBudgetBoundsReaders: Readers sharing a Budget grow only while the
// total stays under its limit; one refused keeps what it read (and can skip
// the frame), and a frame that could never fit is refused before its body
// is read. Shrink, Release and Free give the bytes back; Prepend counts
// what it moves even over the limit.
func TestBudgetBoundsReaders(t *testing.T) {
	const base = 8192
	b := wire.NewBudget(64 << 10)
	big := frame('Q', bytes.Repeat([]byte("a"), 40<<10))
	next := frame('S', nil)
	newReader := func(data ...[]byte) *wire.Reader {
		rd := wire.NewReader(bytes.NewReader(bytes.Join(data, nil)), make([]byte, base), 1<<30)
		rd.SetBudget(b)
		return rd
	}
	a := newReader(big, next)
	if err := a.Ensure(len(big) + len(next)); err != nil { // both buffered
		t.Fatal(err)
	}
	if _, err := a.Frame(len(big)); err != nil {
		t.Fatal(err)
	}
	if b.Held() != int64(a.Held()) || a.Held() <= 0 || a.Held() > len(big)+len(next) {
		t.Fatalf("after a %d-byte frame: budget holds %d, reader %d", len(big), b.Held(), a.Held())
	}
	c := newReader(big, next)
	_, err := c.Frame(len(big))
	var be *wire.BudgetError
	if !errors.As(err, &be) || !errors.Is(err, wire.ErrOverBudget) || be.Limit != 64<<10 {
		t.Fatalf("second 40 KiB frame under a 64 KiB budget: want = *BudgetError, got = %v", err)
	}
	if c.Buffered() == 0 {
		t.Fatal("the refused reader lost the bytes it had read")
	}
	if err := c.Stream(nil, len(big)); err != nil {
		t.Fatal(err)
	}
	if f, err := c.Frame(len(next)); err != nil || !bytes.Equal(f, next) {
		t.Fatalf("after skipping the refused frame: want = %q, got = %q (%v)", next, f, err)
	}
	c.Shrink()
	if int64(a.Held()+c.Held()) != b.Held() {
		t.Fatalf("budget holds %d, readers %d + %d", b.Held(), a.Held(), c.Held())
	}
	a.Shrink() // a still has next unread: keeps its buffer
	if a.Held() == 0 {
		t.Fatal("Shrink dropped a buffer holding unread bytes")
	}
	if _, err := a.Frame(len(next)); err != nil {
		t.Fatal(err)
	}
	a.Shrink()
	if b.Held() != 0 || a.Held() != 0 || len(a.Buffer()) != base {
		t.Fatalf("after Shrink: budget holds %d, reader %d (buffer %d bytes)", b.Held(), a.Held(), len(a.Buffer()))
	}

	// Never fits: refused on the header alone.
	cr := &countingReader{r: bytes.NewReader(append(rawHeader('Q', 1<<20), make([]byte, 100<<10)...))}
	d := wire.NewReader(cr, make([]byte, base), 1<<30)
	d.SetBudget(b)
	_, n, err := d.Header()
	if err != nil {
		t.Fatal(err)
	}
	reads := cr.reads
	if err := d.Ensure(n); !errors.As(err, &be) {
		t.Fatalf("a 1 MiB frame under a 64 KiB budget: want = *BudgetError, got = %v", err)
	}
	if cr.reads != reads || len(d.Buffer()) != base {
		t.Fatalf("a frame that can never fit was read (%d more reads, buffer %d bytes)", cr.reads-reads, len(d.Buffer()))
	}

	// Prepend of more than the limit allows is counted all the same.
	e := newReader()
	e.Prepend(bytes.Repeat([]byte("p"), 100<<10))
	if b.Held() != int64(100<<10+0-base) || e.Held() != 100<<10-base {
		t.Fatalf("after Prepend of 100 KiB: budget holds %d, reader %d", b.Held(), e.Held())
	}
	e.Free()
	if b.Held() != 0 {
		t.Fatalf("after Free: budget holds %d", b.Held())
	}

	// TakeBuffer hands a grown buffer over, its count with it (all of it
	// now), and the frame read from it stays valid.
	g := newReader(big, next)
	fr, err := g.Frame(len(big))
	if err != nil {
		t.Fatal(err)
	}
	taken, held, ok := g.TakeBuffer()
	if !ok || held != len(taken) {
		t.Fatalf("TakeBuffer of a grown buffer holding nothing unread: ok %v, %d bytes counted for %d", ok, held, len(taken))
	}
	if !bytes.Equal(fr, big) {
		t.Fatal("the frame changed after TakeBuffer")
	}
	if g.Held() != 0 || len(g.Buffer()) != base || b.Held() != int64(held) {
		t.Fatalf("after TakeBuffer: reader holds %d (buffer %d bytes), budget %d", g.Held(), len(g.Buffer()), b.Held())
	}
	if f, err := g.Frame(len(next)); err != nil || !bytes.Equal(f, next) {
		t.Fatalf("reading on after TakeBuffer: %q, %v", f, err)
	}
	if _, _, ok := g.TakeBuffer(); ok {
		t.Fatal("TakeBuffer of a base buffer succeeded")
	}
	b.Return(held)
	if b.Held() != 0 {
		t.Fatalf("after the taken buffer's count was given back: budget holds %d", b.Held())
	}

	// A pooled Reader released while grown and empty gives its count back.
	var pool wire.Pool
	f := wire.NewPooledReader(bytes.NewReader(big), &pool, 1<<30)
	f.SetBudget(b)
	if _, err := f.Frame(len(big)); err != nil {
		t.Fatal(err)
	}
	f.Release()
	if b.Held() != 0 || f.Buffered() != 0 {
		t.Fatalf("after Release: budget holds %d", b.Held())
	}
}
