# dmfs: set-up, demo and tests.
#
#   make run     install what is missing (and link $(BINDIR)/dmfs for the systemd unit),
#                mount ./pool at ./mnt with a 1 GiB demo.img
#   make stop    unmount ./mnt
#   make test    install what is missing, run the whole test suite
#                (PYTEST_ARGS='-k ext4 -x' to select; DMFS_SLOW=1 for the longer variants)
#   make bench   passthrough vs dmfs (vs qemu-storage-daemon if installed), bench/README.md
#                (BENCH_ARGS='--quick' for a short run; BASELINE=REV also runs dmfs at
#                git revision REV, alternating with this tree's, and prints the ratios)
#   make bench-scale  mount seconds and RSS per exception of a snapshot with 1M exceptions
#                (SCALE_ARGS='--exceptions 100000 --runs 1' for a short run), bench/README.md
#   make clean   remove .venv and caches (never ./pool)
#
# Everything that needs root (apt, mount, losetup) expects to run as root.

SHELL   := /bin/bash
PYTHON  ?= python3
VENV    := .venv
POOL    := pool
MNT     := mnt
PYTEST_ARGS ?=
BENCH_ARGS ?=
BASELINE ?=
SCALE_ARGS ?=

APT_PACKAGES := fuse3 libfuse3-dev pkg-config attr e2fsprogs fio util-linux \
                python3-venv gcc python3-dev systemd xfsprogs btrfs-progs
# A standard NBD server and client, to serve volumes beyond this machine (README).
APT_PACKAGES += nbdkit libnbd-bin

# Where the systemd unit (contrib/systemd/dmfs@.service) expects the command.
BINDIR ?= /usr/local/bin

# "mounted" when MNT is in the mount table as a dmfs FUSE mount
# (findmnt reads /proc/self/mountinfo, so a hung daemon cannot block it).
IS_DMFS_MOUNT = findmnt -rn -t fuse.dmfs --mountpoint "$(abspath $(MNT))" >/dev/null 2>&1

.PHONY: deps apt-deps run stop test bench bench-scale clean hints install-bin

deps: apt-deps $(VENV)/.stamp

# apt only for what dpkg says is missing; no apt-get update when nothing is.
apt-deps:
	@missing=""; \
	for p in $(APT_PACKAGES); do \
	  dpkg -s "$$p" 2>/dev/null | grep -q '^Status: install ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" -ne 0 ]; then echo "make deps: missing packages:$$missing (run as root)" >&2; exit 1; fi; \
	  echo "make deps: installing$$missing"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get update && apt-get install -y$$missing; \
	fi

$(VENV)/bin/python: | apt-deps
	$(PYTHON) -m venv $(VENV)

# Reinstall only when pyproject.toml changed since the last install.
$(VENV)/.stamp: pyproject.toml | apt-deps $(VENV)/bin/python
	$(VENV)/bin/pip install -e '.[test]'
	touch $@

# $(BINDIR)/dmfs -> this checkout's command, for the systemd unit.  A link
# that already leads to a dmfs (another checkout) or a file that is not a
# link is left alone, saying so.
install-bin: deps
	@target="$(abspath $(VENV))/bin/dmfs"; link="$(BINDIR)/dmfs"; \
	if [ "$$(readlink "$$link" 2>/dev/null)" = "$$target" ]; then exit 0; fi; \
	if [ -e "$$link" ] || [ -L "$$link" ] && [ ! -L "$$link" ]; then \
	  echo "make install-bin: $$link exists and is not a link; left alone" >&2; exit 0; fi; \
	if [ -L "$$link" ] && [ -x "$$link" ]; then \
	  echo "make install-bin: $$link already leads to $$(readlink "$$link"); left alone"; exit 0; fi; \
	if [ "$$(id -u)" -ne 0 ]; then echo "make install-bin: run as root to link $$link" >&2; exit 0; fi; \
	mkdir -p "$(BINDIR)" && ln -sfn "$$target" "$$link" && echo "make install-bin: $$link -> $$target"

run: deps install-bin
	@if $(IS_DMFS_MOUNT); then \
	  if ! stat -t $(MNT)/. >/dev/null 2>&1; then \
	    echo "$(MNT): stale dmfs mount (the daemon is gone); run 'make stop' first" >&2; exit 1; \
	  fi; \
	  echo "$(MNT) is already a dmfs mount"; \
	else \
	  mkdir -p $(POOL) $(MNT) && $(VENV)/bin/dmfs mount $(POOL) $(MNT); \
	fi
	@[ -e $(MNT)/demo.img ] || truncate -s 1G $(MNT)/demo.img
	@$(MAKE) --no-print-directory hints

hints:
	@echo "dmfs: pool ./$(POOL) mounted at ./$(MNT) with a 1 GiB demo.img. Try (README.md has the full tutorial):"
	@echo '  dev=$$(losetup --direct-io=on -f --show $(MNT)/demo.img); mkfs.ext4 -q -E nodiscard $$dev'
	@echo '  setfattr -n user.dmfs.snapshot -v "snap1 chunk_size=4K" $(MNT)/demo.img   # -> $(MNT)/demo@snap1.img'
	@echo '  getfattr --only-values -n user.dmfs.status $(MNT)/demo@snap1.img; echo; $(VENV)/bin/dmfs status $(MNT)'
	@echo '  losetup -d $$dev; make stop'

stop:
	@if $(IS_DMFS_MOUNT); then \
	  $(VENV)/bin/dmfs umount $(MNT); \
	else \
	  echo "$(MNT) is not mounted"; \
	fi

# The layer contracts in pyproject.toml first: an import that points up fails the run.
test: deps install-bin
	$(VENV)/bin/lint-imports --no-cache
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)

bench: deps
	$(VENV)/bin/python bench/run.py $(if $(BASELINE),--baseline $(BASELINE)) $(BENCH_ARGS)

bench-scale: deps
	$(VENV)/bin/python bench/scale.py $(SCALE_ARGS)

clean:
	@if $(IS_DMFS_MOUNT); then echo "$(MNT) is still mounted; run 'make stop' first" >&2; exit 1; fi
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info
	find . -path ./$(POOL) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
