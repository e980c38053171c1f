package overlay

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"time"

	"github.com/vxnet/vxnet/api"
	"github.com/vxnet/vxnet/kvstore"
)

// maxBody bounds request bodies: every request is a small JSON object, and
// a larger body is refused with 413 rather than read.
const maxBody = 64 << 10

// MaxHeaderBytes bounds a request's headers: the CLI sends a handful.
const MaxHeaderBytes = 16 << 10

// Handler serves the agent's API (see package api for the routes).
func (a *Agent) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/version", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, map[string]string{"version": api.Version})
	})
	mux.HandleFunc("GET /v1/status", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, a.ProbeStatus(r.Context()))
	})
	mux.HandleFunc("GET /v1/networks", func(w http.ResponseWriter, r *http.Request) {
		out, err := a.Networks(r.Context())
		if errors.Is(err, kvstore.ErrUnavailable) {
			// A listing can be answered from the agent's own view.
			warn(w, "the store does not answer: networks as this agent last saw them")
			out, err = a.cachedNetworks(), nil
		}
		a.reply(w, r, http.StatusOK, out, err)
	})
	mux.HandleFunc("POST /v1/networks", func(w http.ResponseWriter, r *http.Request) {
		var req api.CreateNetworkRequest
		if err := decodeBody(w, r, &req); err != nil {
			a.reply(w, r, 0, nil, err)
			return
		}
		out, err := a.CreateNetwork(r.Context(), req)
		a.reply(w, r, http.StatusCreated, out, err)
	})
	mux.HandleFunc("GET /v1/networks/{name}", func(w http.ResponseWriter, r *http.Request) {
		out, err := a.InspectNetwork(r.Context(), r.PathValue("name"))
		a.reply(w, r, http.StatusOK, out, err)
	})
	mux.HandleFunc("DELETE /v1/networks/{name}", func(w http.ResponseWriter, r *http.Request) {
		err := a.RemoveNetwork(r.Context(), r.PathValue("name"))
		a.reply(w, r, http.StatusNoContent, nil, err)
	})
	mux.HandleFunc("POST /v1/networks/{name}/endpoints", func(w http.ResponseWriter, r *http.Request) {
		var req api.AttachRequest
		if err := decodeBody(w, r, &req); err != nil {
			a.reply(w, r, 0, nil, err)
			return
		}
		out, err := a.Attach(r.Context(), r.PathValue("name"), req)
		a.reply(w, r, http.StatusCreated, out, err)
	})
	mux.HandleFunc("DELETE /v1/networks/{name}/endpoints/{endpoint}", func(w http.ResponseWriter, r *http.Request) {
		err := a.Detach(r.Context(), r.PathValue("name"), r.PathValue("endpoint"))
		a.reply(w, r, http.StatusNoContent, nil, err)
	})
	mux.HandleFunc("PUT /v1/networks/{name}/endpoints/{endpoint}/netns", func(w http.ResponseWriter, r *http.Request) {
		var req api.NetnsRequest
		if err := decodeBody(w, r, &req); err != nil {
			a.reply(w, r, 0, nil, err)
			return
		}
		err := a.SetNetns(r.Context(), r.PathValue("name"), r.PathValue("endpoint"), req.Netns)
		a.reply(w, r, http.StatusNoContent, nil, err)
	})
	mux.HandleFunc("PUT /v1/networks/{name}/endpoints/{endpoint}/aliases", func(w http.ResponseWriter, r *http.Request) {
		var req api.AliasesRequest
		if err := decodeBody(w, r, &req); err != nil {
			a.reply(w, r, 0, nil, err)
			return
		}
		err := a.SetAliases(r.Context(), r.PathValue("name"), r.PathValue("endpoint"), req.Aliases)
		a.reply(w, r, http.StatusNoContent, nil, err)
	})
	mux.HandleFunc("POST /v1/network-plans", func(w http.ResponseWriter, r *http.Request) {
		var req api.CreateNetworkRequest
		if err := decodeBody(w, r, &req); err != nil {
			a.reply(w, r, 0, nil, err)
			return
		}
		out, err := a.PlanNetwork(r.Context(), req)
		a.reply(w, r, http.StatusOK, out, err)
	})
	mux.HandleFunc("POST /v1/networks/{name}/addresses", func(w http.ResponseWriter, r *http.Request) {
		var req api.ReserveRequest
		if err := decodeBody(w, r, &req); err != nil {
			a.reply(w, r, 0, nil, err)
			return
		}
		out, err := a.Reserve(r.Context(), r.PathValue("name"), req.IP)
		a.reply(w, r, http.StatusCreated, out, err)
	})
	mux.HandleFunc("DELETE /v1/networks/{name}/addresses/{ip}", func(w http.ResponseWriter, r *http.Request) {
		err := a.ReleaseReservation(r.Context(), r.PathValue("name"), r.PathValue("ip"))
		a.reply(w, r, http.StatusNoContent, nil, err)
	})
	mux.HandleFunc("GET /v1/endpoints", func(w http.ResponseWriter, r *http.Request) {
		out, err := a.Endpoints(r.Context(), r.URL.Query().Get("network"))
		if errors.Is(err, kvstore.ErrUnavailable) {
			warn(w, "the store does not answer: only this host's endpoints, from its journal")
			out, err = a.localEndpoints(r.URL.Query().Get("network")), nil
		}
		a.reply(w, r, http.StatusOK, out, err)
	})
	mux.HandleFunc("GET /v1/nodes", func(w http.ResponseWriter, r *http.Request) {
		out, err := a.Nodes(r.Context())
		a.reply(w, r, http.StatusOK, out, err)
	})
	mux.HandleFunc("DELETE /v1/nodes/{name}", func(w http.ResponseWriter, r *http.Request) {
		err := a.RemoveNode(r.Context(), r.PathValue("name"))
		a.reply(w, r, http.StatusNoContent, nil, err)
	})
	mux.HandleFunc("GET /v1/events", a.serveEvents)
	mux.HandleFunc("GET /v1/doctor", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, a.Doctor(r.Context()))
	})
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusNotFound, api.Error{Message: fmt.Sprintf("no route %s %s", r.Method, r.URL.Path), Code: api.CodeNotFound})
	})
	// Every request is bounded: a store that stops answering fails it
	// with "store unavailable" in seconds, and a client that went away
	// cancels it through the same context.
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/v1/events" {
			mux.ServeHTTP(w, r) // a stream: it lasts as long as its reader
			return
		}
		ctx, cancel := context.WithTimeout(r.Context(), RequestTimeout)
		defer cancel()
		mux.ServeHTTP(w, r.WithContext(ctx))
	})
}

// RequestTimeout bounds one API request; attach and detach have a shorter
// bound of their own (AttachTimeout) plus their rollback.
const RequestTimeout = 12 * time.Second

// decodeBody reads one JSON object and refuses unknown fields, so that a
// misspelt option is an error rather than silently ignored. A body over
// maxBody is an error of its own (413), not a truncated JSON value: the
// client must learn that it hit a limit, and the server closes the
// connection rather than read the rest.
func decodeBody(w http.ResponseWriter, r *http.Request, v any) error {
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, maxBody))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		var tooLarge *http.MaxBytesError
		switch {
		case errors.As(err, &tooLarge):
			return &codedError{code: api.CodeInvalid, err: err,
				msg: fmt.Sprintf("request body over the limit of %d bytes (%d KiB)", tooLarge.Limit, tooLarge.Limit>>10)}
		case errors.Is(err, os.ErrDeadlineExceeded):
			return &codedError{code: api.CodeInvalid, err: err,
				msg: fmt.Sprintf("request body not received within %s", ServerTimeouts.Read)}
		}
		return invalidf("malformed request body: %v", err)
	}
	if dec.More() {
		return invalidf("malformed request body: more than one JSON value")
	}
	return nil
}

func (a *Agent) reply(w http.ResponseWriter, r *http.Request, status int, out any, err error) {
	if err == nil {
		if status == http.StatusNoContent {
			w.WriteHeader(status)
			return
		}
		writeJSON(w, status, out)
		return
	}
	code := ErrorCode(err)
	httpStatus := map[string]int{
		api.CodeInvalid:     http.StatusBadRequest,
		api.CodeNotFound:    http.StatusNotFound,
		api.CodeConflict:    http.StatusConflict,
		api.CodeUnavailable: http.StatusServiceUnavailable,
	}[code]
	if httpStatus == 0 {
		httpStatus = http.StatusInternalServerError
	}
	var tooLarge *http.MaxBytesError
	if errors.As(err, &tooLarge) {
		httpStatus = http.StatusRequestEntityTooLarge
	}
	level := slog.LevelInfo
	if httpStatus >= 500 {
		level = slog.LevelError
	}
	a.log.Log(r.Context(), level, "request failed", "method", r.Method, "path", r.URL.Path, "status", httpStatus, "err", err)
	writeJSON(w, httpStatus, api.Error{Message: err.Error(), Code: code})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	if err := enc.Encode(v); err != nil && !errors.Is(err, http.ErrHandlerTimeout) {
		slog.Debug("write response", "err", err)
	}
}

// ServerTimeouts are the unix socket server's limits: a slow or silent
// client holds a connection (and so one of the capped connection slots)
// for a bounded time.
//
//   - ReadHeader and Read bound the request's headers and, with the body,
//     the whole request: a client that sends headers and trickles the body
//     is cut off after Read.
//   - Write runs from the end of the headers to the end of the response,
//     so it covers the handler: an attach makes a few store round trips of
//     up to 5 s each (the store's request timeout) and may take ~15 s on a
//     slow store; twice that leaves room without letting a client that
//     never reads pin the connection.
//   - Idle bounds a kept-alive connection between requests.
var ServerTimeouts = struct{ ReadHeader, Read, Write, Idle time.Duration }{
	ReadHeader: 5 * time.Second,
	Read:       10 * time.Second,
	Write:      30 * time.Second,
	Idle:       60 * time.Second,
}

// serveEvents streams the agent's events as JSON lines, first those kept
// since ?since= (a duration such as 10m, or an RFC 3339 time), then each as
// it happens, until the client goes away. A reader that falls behind gets
// an overflow event and the end of the stream.
func (a *Agent) serveEvents(w http.ResponseWriter, r *http.Request) {
	since := time.Now()
	if s := r.URL.Query().Get("since"); s != "" {
		if d, err := time.ParseDuration(s); err == nil && d >= 0 {
			since = since.Add(-d)
		} else if t, err := time.Parse(time.RFC3339, s); err == nil {
			since = t
		} else {
			a.reply(w, r, 0, nil, invalidf("since %q: give a duration (10m) or an RFC 3339 time", s))
			return
		}
	}
	// The server's write timeout is for answers, not for streams.
	rc := http.NewResponseController(w)
	rc.SetWriteDeadline(time.Time{})
	past, ch, stop := a.events.follow(since)
	defer stop()
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.WriteHeader(http.StatusOK)
	enc := json.NewEncoder(w)
	for _, ev := range past {
		if enc.Encode(ev) != nil {
			return
		}
	}
	if rc.Flush() != nil {
		return
	}
	for {
		select {
		case <-r.Context().Done():
			return
		case ev, ok := <-ch:
			if !ok {
				enc.Encode(api.Event{Time: time.Now().UTC(), Kind: "overflow", Detail: "this reader fell behind; events were dropped"})
				rc.Flush()
				return
			}
			if enc.Encode(ev) != nil || rc.Flush() != nil {
				return
			}
		}
	}
}

// warn attaches a warning to an answer (HTTP's Warning header, code 199):
// the CLI prints it beside the listing.
func warn(w http.ResponseWriter, msg string) {
	w.Header().Add("Warning", fmt.Sprintf("199 vxnetd %q", msg))
}
