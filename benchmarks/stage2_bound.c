/*
 * How fast can the Sparks op's stage 2 go on this core? A hand-written AVX-512 bound.
 *
 * Stage 2 of the 64->64, 56x56 ResNet-18 layer is 64 output channels x 64 input channels x
 * 49 pixel tiles = 200,704 gathers. Each gather is one 64-byte row of stage-1 responses (64
 * pixels) picked by a codeword index and added into a byte accumulator. This program times
 * the same loop shape as the TVM kernel (schedules/host.py), written with intrinsics:
 *   - pre-scaled uint16 indices and a mask;
 *   - groups of 8 channels summed in bytes, then widened into two uint16 accumulators;
 * and, as the ceiling, the same number of 64-byte load-adds from consecutive addresses.
 * Each is timed on a 64 KB stage-1 block (K=16, as in the kernel) and a 16 KB one (K=4, in L1).
 *
 *   gcc -O3 -march=native benchmarks/stage2_bound.c -o /tmp/stage2_bound && /tmp/stage2_bound
 *
 * It needs AVX-512BW. README.md ("Performance") compares its numbers with the kernel's
 * stage-2 share of the 64->64 layer.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define C 64     /* input channels */
#define O 64     /* output channels */
#define T 64     /* pixels per tile: one zmm of bytes */
#define KMAX 16
#define TILES 49 /* 56x56 = 3136 pixels */

static uint8_t s1[C * KMAX * T] __attribute__((aligned(64)));
static uint16_t idx[O * C];
static uint16_t acc[O * T] __attribute__((aligned(64)));

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

/* One pixel tile of stage 2: the TVM kernel's loop nest. */
__attribute__((noinline)) static void gather_tile(int k) {
  for (int o = 0; o < O; o++) {
    __m512i a0 = _mm512_setzero_si512(), a1 = a0;
    const uint16_t *ix = idx + o * C;
    for (int g = 0; g < C / 8; g++) {
      __m512i part = _mm512_setzero_si512();
      for (int j = 0; j < 8; j++) {
        int c = g * 8 + j;
        /* index pre-multiplied by T: the row offset is one AND */
        const uint8_t *row = s1 + c * k * T + (ix[c] & ((k - 1) * T));
        part = _mm512_add_epi8(part, _mm512_loadu_si512(row));
      }
      a0 = _mm512_add_epi16(a0, _mm512_cvtepu8_epi16(_mm512_castsi512_si256(part)));
      a1 = _mm512_add_epi16(a1, _mm512_cvtepu8_epi16(_mm512_extracti64x4_epi64(part, 1)));
    }
    _mm512_storeu_si512(acc + o * T, a0);
    _mm512_storeu_si512(acc + o * T + 32, a1);
  }
}

/* The same load-adds with no index: consecutive rows of the block. */
__attribute__((noinline)) static void stream_tile(int k) {
  int rows = C * k; /* a power of two */
  for (int o = 0; o < O; o++) {
    __m512i a0 = _mm512_setzero_si512(), a1 = a0;
    for (int g = 0; g < C / 8; g++) {
      __m512i part = _mm512_setzero_si512();
      for (int j = 0; j < 8; j++) {
        int r = (o * C + g * 8 + j) & (rows - 1);
        part = _mm512_add_epi8(part, _mm512_loadu_si512(s1 + r * T));
      }
      a0 = _mm512_add_epi16(a0, _mm512_cvtepu8_epi16(_mm512_castsi512_si256(part)));
      a1 = _mm512_add_epi16(a1, _mm512_cvtepu8_epi16(_mm512_extracti64x4_epi64(part, 1)));
    }
    _mm512_storeu_si512(acc + o * T, a0);
    _mm512_storeu_si512(acc + o * T + 32, a1);
  }
}

static double ns_per_gather(void (*f)(int), int k) {
  int reps = 2000;
  for (int i = 0; i < 200; i++) f(k);
  double best = 1e30;
  for (int r = 0; r < 5; r++) {
    double t = now();
    for (int i = 0; i < reps; i++) f(k);
    t = (now() - t) / reps / (O * C) * 1e9;
    if (t < best) best = t;
  }
  return best;
}

int main(void) {
  srand(1);
  for (int i = 0; i < C * KMAX * T; i++) s1[i] = (uint8_t)(rand() % 19);
  for (int i = 0; i < O * C; i++) idx[i] = (uint16_t)((rand() % KMAX) * T);
  printf("%-28s %10s %24s\n", "loop", "ns/gather", "64->64 stage 2 (49 tiles)");
  int ks[2] = {16, 4};
  for (int i = 0; i < 2; i++) {
    int k = ks[i];
    double g = ns_per_gather(gather_tile, k), s = ns_per_gather(stream_tile, k);
    printf("gather, K=%-2d (%2d KB block)   %10.3f %21.1f us\n", k, C * k * T / 1024, g, g * O * C * TILES * 1e-3);
    printf("stream, K=%-2d (%2d KB block)   %10.3f %21.1f us\n", k, C * k * T / 1024, s, s * O * C * TILES * 1e-3);
  }
  return acc[1] == 0xFFFF; /* keep the stores */
}
