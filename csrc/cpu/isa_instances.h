// Compiles the kernel header named by LMKERN_ISA_KERNELS once per instruction set: AVX-512 and
// AVX2 (x86-64 with GCC) and portable. Each copy lives in its own namespace (avx512, avx2,
// portable) and target region, with internal linkage (no interposable symbols: everything
// inlines); the .cpp picks one at run time by isa_name() (norm_cpu.cpp), so the binary runs on any
// CPU. Inside each copy, `Isa` is the simd.h register set and simd_math.h's helpers are in scope
// (LMKERN_ISA_ID, 0 portable, 1 AVX2, 2 AVX-512, only while simd_math.h is read).
//
// Usage, once per .cpp, after everything the kernels refer to is declared:
//   #define LMKERN_ISA_KERNELS "foo_cpu_kernels.h"
//   #define LMKERN_ISA_KERNELS_MORE "foo_more_kernels.h"   (optional: a second header, after it)
//   #include "isa_instances.h"
// Deliberately without include guard.
#ifndef LMKERN_ISA_KERNELS
#error "define LMKERN_ISA_KERNELS (the header to compile per instruction set) first"
#endif

#if LMKERN_X86_SIMD
LMKERN_TARGET_BEGIN(LMKERN_AVX512_ISA)
namespace {
namespace avx512 {
using Isa = Avx512;
#define LMKERN_ISA_ID 2
#include "simd_math.h"
#include LMKERN_ISA_KERNELS
#ifdef LMKERN_ISA_KERNELS_MORE
#include LMKERN_ISA_KERNELS_MORE
#endif
}  // namespace avx512
}  // namespace
LMKERN_TARGET_END

LMKERN_TARGET_BEGIN(LMKERN_AVX2_ISA)
namespace {
namespace avx2 {
using Isa = Avx2;
#define LMKERN_ISA_ID 1
#include "simd_math.h"
#include LMKERN_ISA_KERNELS
#ifdef LMKERN_ISA_KERNELS_MORE
#include LMKERN_ISA_KERNELS_MORE
#endif
}  // namespace avx2
}  // namespace
LMKERN_TARGET_END
#endif

namespace {
namespace portable {
using Isa = Portable;
#define LMKERN_ISA_ID 0
#include "simd_math.h"
#include LMKERN_ISA_KERNELS
#ifdef LMKERN_ISA_KERNELS_MORE
#include LMKERN_ISA_KERNELS_MORE
#endif
}  // namespace portable
}  // namespace

#undef LMKERN_ISA_KERNELS
#undef LMKERN_ISA_KERNELS_MORE

// MAKE(ns) for the copy of the instruction set isa_name() chose (declare isa_name, from
// norm_cpu.cpp, before use), e.g. a table of kernel pointers:
//   static const Table t = LMKERN_CHOSEN_ISA(MAKE_TABLE);
#ifndef LMKERN_CHOSEN_ISA
#if LMKERN_X86_SIMD
#define LMKERN_CHOSEN_ISA(MAKE)                                      \
  (std::strcmp(isa_name(), "avx512") == 0 ? MAKE(avx512)             \
   : std::strcmp(isa_name(), "avx2") == 0 ? MAKE(avx2) : MAKE(portable))
#else
#define LMKERN_CHOSEN_ISA(MAKE) MAKE(portable)
#endif
#endif
