# Convenience wrappers around scripts/ (the scripts do all set-up themselves).
.PHONY: run test bench lint
run:
	./scripts/demo.sh
test:
	./scripts/test.sh
bench:
	./scripts/bench.sh
lint:
	cargo fmt --all --check
	cargo clippy --release --workspace --all-targets -- -D warnings
