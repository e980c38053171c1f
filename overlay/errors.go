package overlay

import (
	"context"
	"errors"
	"fmt"

	"github.com/vxnet/vxnet/api"
	"github.com/vxnet/vxnet/ipam"
	"github.com/vxnet/vxnet/kvstore"
)

// codedError is an error meant for the user, with the API code it maps to.
type codedError struct {
	code string
	msg  string
	err  error
}

func (e *codedError) Error() string {
	if e.err != nil {
		return e.msg + ": " + e.err.Error()
	}
	return e.msg
}

func (e *codedError) Unwrap() error { return e.err }

func invalidf(format string, a ...any) error {
	return &codedError{code: api.CodeInvalid, msg: fmt.Sprintf(format, a...)}
}

func notFoundf(format string, a ...any) error {
	return &codedError{code: api.CodeNotFound, msg: fmt.Sprintf(format, a...)}
}

func conflictf(format string, a ...any) error {
	return &codedError{code: api.CodeConflict, msg: fmt.Sprintf(format, a...)}
}

// ErrorCode classifies an error returned by the agent for the API.
func ErrorCode(err error) string {
	var ce *codedError
	switch {
	case errors.As(err, &ce):
		return ce.code
	case errors.Is(err, ipam.ErrInvalid):
		return api.CodeInvalid
	case errors.Is(err, ipam.ErrInUse), errors.Is(err, ipam.ErrExhausted), errors.Is(err, kvstore.ErrConflict):
		return api.CodeConflict
	case errors.Is(err, kvstore.ErrUnavailable), errors.Is(err, context.DeadlineExceeded):
		// A deadline passed: the store (or the agent's lock, held by a
		// pass waiting for the store) did not answer in time.
		return api.CodeUnavailable
	}
	return api.CodeInternal
}
