# Convenience wrappers around scripts/ (the scripts do all set-up themselves).
.PHONY: demo run test bench bench-cluster lint
demo:
	./scripts/demo.sh
run:
	./scripts/run.sh
test:
	./scripts/test.sh
bench:
	./scripts/bench.sh
bench-cluster:
	./scripts/bench-cluster.sh
lint:
	cargo fmt --all --check
	cargo clippy --release --workspace --all-targets -- -D warnings
