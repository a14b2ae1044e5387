// Command kiln-cacheprog is the GOCACHEPROG program of Kiln's build sandbox.
//
// The go command starts it and sends it JSON requests on stdin ("get", "put", "close";
// see cmd/go/internal/cacheprog). It answers from the worker that runs the build, which
// it reaches over the Unix socket named by KILN_CACHEPROG_SOCKET; it never talks to the
// shared store and holds no credential. The worker writes every object it hands out into
// the directory named by KILN_CACHEPROG_OUTPUTS (read-only here), so a response's
// DiskPath points there. If the worker cannot be reached, a get is a miss and a put is
// kept in a file of GOCACHE: a build never fails because the cache is down.
//
// The worker's protocol, one request per line on a connection:
//
//	{"Command":"get","ActionID":"<hex>"}
//	  -> {"Miss":true} or {"OutputID":"<hex>","Size":n,"Name":"<path under outputs>"}
//	{"Command":"put","ActionID":"<hex>","OutputID":"<hex>","Size":n} + n raw bytes
//	  -> {"Name":"<path under outputs>"} or {"Err":"..."}
package main

import (
	"bufio"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"
)

// connections to the worker kept open at once: the go command asks in parallel
const maxConns = 8

// dialTimeout bounds the wait for the worker's socket; ioTimeout one exchange
const (
	dialTimeout = 5 * time.Second
	ioTimeout   = 120 * time.Second
)

type request struct {
	ID       int64
	Command  string
	ActionID []byte `json:",omitempty"`
	OutputID []byte `json:",omitempty"`
	BodySize int64  `json:",omitempty"`
}

type response struct {
	ID            int64
	Err           string     `json:",omitempty"`
	KnownCommands []string   `json:",omitempty"`
	Miss          bool       `json:",omitempty"`
	OutputID      []byte     `json:",omitempty"`
	Size          int64      `json:",omitempty"`
	Time          *time.Time `json:",omitempty"`
	DiskPath      string     `json:",omitempty"`
}

type workerRequest struct {
	Command  string
	ActionID string
	OutputID string `json:",omitempty"`
	Size     int64  `json:",omitempty"`
}

type workerResponse struct {
	Miss     bool
	OutputID string
	Size     int64
	Name     string
	Err      string
}

type conn struct {
	c net.Conn
	r *bufio.Reader
}

type prog struct {
	socket   string
	outputs  string
	fallback string
	pool     chan *conn
	slots    chan struct{}
	down     sync.Once
	mu       sync.Mutex
	out      *json.Encoder
}

func main() {
	p := &prog{
		socket:   os.Getenv("KILN_CACHEPROG_SOCKET"),
		outputs:  os.Getenv("KILN_CACHEPROG_OUTPUTS"),
		fallback: filepath.Join(os.Getenv("GOCACHE"), "kiln-cacheprog"),
		pool:     make(chan *conn, maxConns),
		slots:    make(chan struct{}, maxConns),
	}
	w := bufio.NewWriter(os.Stdout)
	p.out = json.NewEncoder(w)
	flush := func(r *response) {
		p.mu.Lock()
		defer p.mu.Unlock()
		if err := p.out.Encode(r); err == nil {
			w.Flush()
		}
	}
	flush(&response{KnownCommands: []string{"get", "put", "close"}})

	in := bufio.NewReaderSize(os.Stdin, 1<<20)
	dec := json.NewDecoder(in)
	var wg sync.WaitGroup
	for {
		var req request
		if err := dec.Decode(&req); err != nil {
			break // stdin closed: the go command is done
		}
		var body []byte
		if req.Command == "put" && req.BodySize > 0 {
			var b64 []byte
			if err := dec.Decode(&b64); err != nil {
				fmt.Fprintf(os.Stderr, "kiln-cacheprog: reading a put body: %v\n", err)
				os.Exit(1)
			}
			body = b64
		}
		if req.Command == "close" {
			wg.Wait()
			flush(&response{ID: req.ID})
			break
		}
		wg.Add(1)
		go func(req request, body []byte) {
			defer wg.Done()
			flush(p.handle(&req, body))
		}(req, body)
	}
	wg.Wait()
	p.closeAll()
}

func (p *prog) handle(req *request, body []byte) *response {
	switch req.Command {
	case "get":
		return p.get(req)
	case "put":
		return p.put(req, body)
	}
	return &response{ID: req.ID, Err: "unknown command " + req.Command}
}

func (p *prog) get(req *request) *response {
	miss := &response{ID: req.ID, Miss: true}
	var res workerResponse
	if err := p.ask(&workerRequest{Command: "get", ActionID: hex.EncodeToString(req.ActionID)},
		nil, &res); err != nil || res.Miss || res.Err != "" {
		return miss
	}
	out, err := hex.DecodeString(res.OutputID)
	path, ok := p.outputPath(res.Name)
	if err != nil || !ok || len(out) != sha256.Size {
		return miss
	}
	return &response{ID: req.ID, OutputID: out, Size: res.Size, DiskPath: path}
}

func (p *prog) put(req *request, body []byte) *response {
	sum := sha256.Sum256(body)
	if !strings.EqualFold(hex.EncodeToString(sum[:]), hex.EncodeToString(req.OutputID)) {
		return &response{ID: req.ID, Err: "put body does not hash to its output id"}
	}
	var res workerResponse
	err := p.ask(&workerRequest{Command: "put", ActionID: hex.EncodeToString(req.ActionID),
		OutputID: hex.EncodeToString(req.OutputID), Size: int64(len(body))}, body, &res)
	if err == nil && res.Err == "" {
		if path, ok := p.outputPath(res.Name); ok {
			return &response{ID: req.ID, DiskPath: path}
		}
	}
	// the worker is unreachable or refused: keep the object here for this build only
	path, ferr := p.keep(req.OutputID, body)
	if ferr != nil {
		return &response{ID: req.ID, Err: ferr.Error()}
	}
	return &response{ID: req.ID, DiskPath: path}
}

// outputPath returns the file under the outputs directory the worker named.
func (p *prog) outputPath(name string) (string, bool) {
	if p.outputs == "" || name == "" || strings.Contains(name, "..") || filepath.IsAbs(name) {
		return "", false
	}
	return filepath.Join(p.outputs, filepath.FromSlash(name)), true
}

func (p *prog) keep(out []byte, body []byte) (string, error) {
	if err := os.MkdirAll(p.fallback, 0o755); err != nil {
		return "", err
	}
	path := filepath.Join(p.fallback, hex.EncodeToString(out))
	tmp, err := os.CreateTemp(p.fallback, "tmp-")
	if err != nil {
		return "", err
	}
	_, werr := tmp.Write(body)
	cerr := tmp.Close()
	if werr != nil || cerr != nil {
		os.Remove(tmp.Name())
		return "", errors.Join(werr, cerr)
	}
	return path, os.Rename(tmp.Name(), path)
}

// ask sends one request (and body) to the worker and reads its answer.
func (p *prog) ask(req *workerRequest, body []byte, res *workerResponse) error {
	c, err := p.take()
	if err != nil {
		return err
	}
	line, _ := json.Marshal(req)
	c.c.SetDeadline(time.Now().Add(ioTimeout))
	if _, err = c.c.Write(append(line, '\n')); err == nil && body != nil {
		_, err = c.c.Write(body)
	}
	var reply []byte
	if err == nil {
		reply, err = c.r.ReadBytes('\n')
	}
	if err == nil {
		err = json.Unmarshal(reply, res)
	}
	if err != nil {
		c.c.Close()
		<-p.slots
		return err
	}
	p.pool <- c
	return nil
}

// take returns an idle connection, or dials a new one while fewer than maxConns are open.
func (p *prog) take() (*conn, error) {
	select {
	case c := <-p.pool:
		return c, nil
	default:
	}
	select {
	case c := <-p.pool:
		return c, nil
	case p.slots <- struct{}{}:
	}
	if p.socket == "" {
		<-p.slots
		return nil, errors.New("KILN_CACHEPROG_SOCKET is not set")
	}
	c, err := net.DialTimeout("unix", p.socket, dialTimeout)
	if err != nil {
		<-p.slots
		p.down.Do(func() {
			fmt.Fprintf(os.Stderr, "kiln-cacheprog: build cache unavailable, building without it: %v\n", err)
		})
		return nil, err
	}
	return &conn{c: c, r: bufio.NewReader(c)}, nil
}

func (p *prog) closeAll() {
	for {
		select {
		case c := <-p.pool:
			c.c.Close()
		default:
			return
		}
	}
}
