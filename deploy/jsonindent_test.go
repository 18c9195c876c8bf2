package deploy

import (
	"bytes"
	"encoding/json"
)

// jsonIndent indents JSON with two spaces, leaving characters unescaped.
func jsonIndent(buf *bytes.Buffer, js []byte) error {
	var v any
	if err := json.Unmarshal(js, &v); err != nil {
		return err
	}
	enc := json.NewEncoder(buf)
	enc.SetEscapeHTML(false)
	enc.SetIndent("", "  ")
	if err := enc.Encode(v); err != nil {
		return err
	}
	buf.Truncate(buf.Len() - 1)
	return nil
}
