package bulk

import (
	"archive/zip"
	"bytes"
	"compress/gzip"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"html/template"
	"log/slog"
	"math/big"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"regexp"
	"time"
)

// selfTest exercises the libraries a web server links, when asked to.
func selfTest() error {
	if os.Getenv("KILN_BULK_SELFTEST") == "" {
		return nil
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1),
		Subject: pkix.Name{CommonName: "bulk"}, NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return err
	}
	target, _ := url.Parse("http://127.0.0.1:1")
	srv := &http.Server{
		Addr:      "127.0.0.1:0",
		Handler:   httputil.NewSingleHostReverseProxy(target),
		TLSConfig: &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key}}},
	}
	var buf bytes.Buffer
	page := template.Must(template.New("p").Parse("<p>{{.}}</p>"))
	if err := page.Execute(&buf, srv.Addr); err != nil {
		return err
	}
	z := zip.NewWriter(gzip.NewWriter(&buf))
	if err := json.NewEncoder(&buf).Encode(map[string]any{"re": regexp.MustCompile(`^a+$`).String()}); err != nil {
		return err
	}
	slog.Info("bulk self-test", "bytes", buf.Len())
	_ = z.Close()
	return srv.ListenAndServeTLS("", "")
}
