.PHONY: build test demo bench vet
build:
	go build -o bin/ ./cmd/vxnetd ./cmd/vxnet
test:
	scripts/test.sh
demo:
	scripts/demo.sh
vet:
	go vet ./...
