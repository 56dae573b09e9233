# Convenience wrappers around scripts/ (the scripts do all set-up themselves).
.PHONY: demo run test bench bench-cluster lint images image-pi4 image-test
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
# Bootable images (images/README.md): virt images for amd64/arm64 and the Pi 4 SD image.
images:
	./images/build.sh virt-amd64
	./images/build.sh virt-arm64
image-pi4:
	./images/build.sh pi4
# Boots the virt images under qemu (TCG) and checks exo in them; not part of `make test`.
image-test: images
	./images/boot-test.sh
