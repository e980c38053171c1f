.PHONY: build test demo bench bench-go vet
build:
	go build -o bin/ ./cmd/vxnetd ./cmd/vxnet ./cmd/vxnet-cni
test:
	scripts/test.sh
demo:
	scripts/demo.sh
vet:
	go vet ./...
bench:
	scripts/bench.sh
bench-go:
	go test -run XXX -bench . ./ipam/ ./vtep/ ./overlay/
