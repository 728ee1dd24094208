// On-device sampling: greedy argmax, or temperature / top-k / top-p with a counter-based RNG,
// following reference.sample / sampling_support / sample_row.
//
// Two kernels with one contract. Both use one block of 1024 threads per row and the same element
// layout (warp w owns the contiguous segment [w S, (w + 1) S), in rounds of 256 elements, lane l
// taking 8 consecutive ones), and both find every threshold on the order-preserving integer image
// ("key") of the raw logits:
//   * x = logit / temperature (IEEE division) and w = exp(x - max x) are non-decreasing functions of
//     the logit, so the k-th largest x is (k-th largest logit) / temperature and every keep set
//     {x >= thr} or {w >= tau} is an upper set of logit keys.
//   * top-k: the key of the k-th largest non-NaN logit; keep x >= thr_x (ties kept). Integer work.
//   * top-p: c = the largest key with S(c) = sum(w over top-k-kept with key >= c) >= top_p * sum(w);
//     tau = w(c), the reference's tau (the largest w value whose tie-inclusive top set reaches
//     top_p); keep w >= tau, so ties created by rounding (w underflowing to 0, ...) stay.
//   * the token is the first kept index, in index order, whose running sum of w exceeds
//     u * sum(kept w): per-lane sums of 8, a warp scan per round, per-warp totals over the rounds,
//     warps in order; the crossing warp then finds the lane and the element.
// Every float sum has a fixed association, so the same inputs always give the same token.
//
// sample_hist_kernel (bf16 / fp16 logits, V <= 65535: every model vocab but Llama 3's): 2 passes
// over the row in global memory (L2) and the rest in shared memory.
//   pass 1: the row -> a 65536-bin histogram of keys (16-bit counters, two per word, shared-memory
//           integer atomics: order-free and exact) and the max key.
//   top-k:  chunk counts (16 keys a chunk), a block suffix scan, one thread walks the crossing
//           chunk: the exact k-th key. Integer, so bitwise the same as any other exact method.
//   top-p:  all elements with one key share one w, so S(c) is a sum over keys of n(key) * w(key):
//           one exp per distinct kept key (not per element), chunk masses summed in descending key
//           order, a block suffix scan over 64-key groups (fixed shuffle trees), and one warp
//           walks the crossing chunk key by key with the same additions.
//   pass 2: the draw, with the per-element tests and the sums of the general kernel (elements
//           below the keep key are skipped without an exp); the row is staged in shared memory
//           on the way, so the crossing warp rescans shared memory, not the row.
// sample_kernel (general: fp32 logits, any V, or a device without 160 KB of shared memory per
// block): one pass per key bit for top-k (bitwise search), a 4-bit radix descent with per-lane
// sums for top-p, then a draw pass and a rescan; each pass re-reads the row.
// The two kernels agree exactly on greedy, top-k and the draw; their top-p sums S(c) add the same
// terms in different orders, so at a float-rounding tie of S(c) with top_p * sum(w) (as between
// either kernel and the reference) the keep boundary can move by one key.
#include <atomic>
#include <cmath>

#include "common.cuh"

namespace ck {
namespace {

// Temperatures below this (and NaN) are greedy: reference.GREEDY_TEMPERATURE. Dividing by a tiny
// temperature overflows fp32 and would make every kept weight NaN.
constexpr float kGreedyTemperature = 1e-5f;

constexpr int kSampleThreads = 1024;
constexpr int kSampleWarps = kSampleThreads / 32;
constexpr int kRound = 32 * 8;  // elements a warp covers per round: 8 per lane (16-byte loads)

// Raw logit bits, their value, and the order-preserving key (flip the sign bit of positives, all
// bits of negatives): a < b as floats implies key(a) <= key(b) as unsigned ints.
struct LogitBF16 {
  using Raw = uint16_t;
  static constexpr int kBits = 16;
  static constexpr uint32_t kNegInf = 0xff80u;  // raw bits of -inf
  static __device__ __forceinline__ float value(uint32_t r) { return __uint_as_float(r << 16); }
  static __device__ __forceinline__ bool is_nan(uint32_t r) { return (r & 0x7fffu) > 0x7f80u; }
  static __device__ __forceinline__ uint32_t key(uint32_t r) {
    return (r & 0x8000u) ? (~r & 0xffffu) : (r | 0x8000u);
  }
  static __device__ __forceinline__ float key_value(uint32_t k) {
    return value((k & 0x8000u) ? (k & 0x7fffu) : (~k & 0xffffu));
  }
};

struct LogitFP16 {
  using Raw = uint16_t;
  static constexpr int kBits = 16;
  static constexpr uint32_t kNegInf = 0xfc00u;  // raw bits of -inf
  static __device__ __forceinline__ float value(uint32_t r) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(r)));
  }
  static __device__ __forceinline__ bool is_nan(uint32_t r) { return (r & 0x7fffu) > 0x7c00u; }
  static __device__ __forceinline__ uint32_t key(uint32_t r) {
    return (r & 0x8000u) ? (~r & 0xffffu) : (r | 0x8000u);
  }
  static __device__ __forceinline__ float key_value(uint32_t k) {
    return value((k & 0x8000u) ? (k & 0x7fffu) : (~k & 0xffffu));
  }
};

struct LogitFP32 {
  using Raw = uint32_t;
  static constexpr int kBits = 32;
  static __device__ __forceinline__ float value(uint32_t r) { return __uint_as_float(r); }
  static __device__ __forceinline__ bool is_nan(uint32_t r) {
    return (r & 0x7fffffffu) > 0x7f800000u;
  }
  static __device__ __forceinline__ uint32_t key(uint32_t r) {
    return (r & 0x80000000u) ? ~r : (r | 0x80000000u);
  }
  static __device__ __forceinline__ float key_value(uint32_t k) {
    return value((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
  }
};

// 8 raw logits starting at i0 (n of them valid, the rest 0). vec: V % 8 == 0 and aligned rows.
// The logits were just written by the lm_head kernel: coherent loads (after the PDL wait).
template <typename L>
__device__ __forceinline__ void load_raw8(const typename L::Raw* row, int i0, int n, bool vec,
                                          uint32_t (&raw)[8]) {
  if (vec && n == 0) {
    // A lane past the end of its segment (vec: n is 0 or 8): no load, which could otherwise read
    // up to a round past the end of the last row.
#pragma unroll
    for (int j = 0; j < 8; ++j) raw[j] = 0u;
  } else if (vec) {
    if (L::kBits == 16) {
      const uint4 v = ld16(row + i0);
      raw[0] = v.x & 0xffffu; raw[1] = v.x >> 16;
      raw[2] = v.y & 0xffffu; raw[3] = v.y >> 16;
      raw[4] = v.z & 0xffffu; raw[5] = v.z >> 16;
      raw[6] = v.w & 0xffffu; raw[7] = v.w >> 16;
    } else {
      const uint4 a = ld16(row + i0), b = ld16(row + i0 + 4);
      raw[0] = a.x; raw[1] = a.y; raw[2] = a.z; raw[3] = a.w;
      raw[4] = b.x; raw[5] = b.y; raw[6] = b.z; raw[7] = b.w;
    }
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j) raw[j] = j < n ? static_cast<uint32_t>(row[i0 + j]) : 0u;
  }
}

// Visits the row: warp w owns the contiguous segment [w S, (w + 1) S) (S a multiple of kRound),
// in rounds of kRound elements, lane l taking 8 consecutive ones. The loop is warp-uniform, so `f`
// may use warp collectives; lanes past the end get n = 0.
template <typename L, typename F>
__device__ __forceinline__ void visit_row(const typename L::Raw* row, int V, int S, bool vec, F&& f) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int seg0 = warp * S;
  const int seg1 = min(seg0 + S, V);
  for (int base = seg0; base < seg1; base += kRound) {
    const int i0 = base + lane * 8;
    const int n = i0 < seg1 ? min(8, seg1 - i0) : 0;
    uint32_t raw[8];
    load_raw8<L>(row, i0, n, vec, raw);
    f(i0, n, raw);
  }
}

// splitmix64 finalizer, constants of reference.mix64.
__device__ __forceinline__ uint64_t mix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// reference.uniform: 24 random bits, exact in fp32, in [0, 1).
__device__ __forceinline__ float uniform01(int64_t seed, int64_t counter) {
  const uint64_t h = mix64(static_cast<uint64_t>(seed) ^ mix64(static_cast<uint64_t>(counter)));
  return static_cast<float>(h >> 40) * (1.0f / 16777216.0f);
}

__device__ __forceinline__ unsigned long long shfl_xor_u64(unsigned long long v, int o) {
  return __shfl_xor_sync(0xffffffffu, v, o);
}

// Block max of 64-bit ints (every thread gets it). buf: __shared__ unsigned long long[32].
__device__ __forceinline__ unsigned long long block_max_u64(unsigned long long v,
                                                            unsigned long long* buf) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const unsigned long long other = shfl_xor_u64(v, o);
    v = other > v ? other : v;
  }
  __syncthreads();
  if ((threadIdx.x & 31) == 0) buf[threadIdx.x >> 5] = v;
  __syncthreads();
  unsigned long long r = buf[0];
  for (int i = 1; i < kSampleWarps; ++i) r = buf[i] > r ? buf[i] : r;
  return r;
}

// Block sum of ints (every thread gets it). buf: __shared__ int[32].
__device__ __forceinline__ int block_sum_int(int v, int* buf) {
  v = __reduce_add_sync(0xffffffffu, v);
  __syncthreads();
  if ((threadIdx.x & 31) == 0) buf[threadIdx.x >> 5] = v;
  __syncthreads();
  int r = 0;
  for (int i = 0; i < kSampleWarps; ++i) r += buf[i];
  return r;
}

// Inclusive warp prefix sum (Hillis-Steele; fixed association, identical on every call).
__device__ __forceinline__ float warp_inclusive_scan(float v) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const float other = __shfl_up_sync(0xffffffffu, v, o);
    if (lane >= o) v += other;
  }
  return v;
}

// grid B, block kSampleThreads.
template <typename L>
__global__ void __launch_bounds__(kSampleThreads)
sample_kernel(const typename L::Raw* logits,  // [B, V]
              const float* temperature,       // [B]
              const int32_t* top_k,           // [B]
              const float* top_p,             // [B]
              const int64_t* seed,            // [B]
              int32_t* positions,             // [B] in/out
              int32_t* token_in,              // [B] out
              int32_t* token_hist,            // [B, hist_len] out
              int V, int hist_len, bool vec) {
  using Raw = typename L::Raw;
  __shared__ int s_pos;
  __shared__ float s_temp, s_top_p;
  __shared__ int s_top_k;
  __shared__ long long s_seed;
  __shared__ unsigned long long s_u64[32];
  __shared__ int s_int[32];
  __shared__ float s_acc[kSampleWarps][16];
  __shared__ float s_red[16];
  __shared__ uint32_t s_prefix;
  __shared__ float s_above, s_need;
  __shared__ float s_warp_total[kSampleWarps];
  __shared__ int s_warp_last[kSampleWarps];
  __shared__ int s_cross_warp;
  __shared__ float s_target, s_cross_base;
  __shared__ int s_tok;

  pdl_begin();
  const int b = blockIdx.x;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const Raw* row = logits + static_cast<int64_t>(b) * V;
  // Segment per warp, a multiple of a round so that rounds never straddle two warps.
  const int S = ceil_div(ceil_div(V, kSampleWarps), kRound) * kRound;

  if (tid == 0) {
    // The row's position is read once, here: the kernel increments it at the very end.
    s_pos = positions[b];
    s_temp = temperature[b];
    s_top_k = top_k[b];
    s_top_p = top_p[b];
    s_seed = seed[b];
  }
  __syncthreads();
  // Padding row: nothing to sample, nothing written, the position stays (block-uniform exit).
  if (s_pos < 0) return;
  const float temp = s_temp;
  int tok = 0;

  if (!(temp >= kGreedyTemperature)) {
    // ---- greedy: first index of the max (NaN counts as the max, like torch.argmax).
    unsigned long long best = 0;
    visit_row<L>(row, V, S, vec, [&](int i0, int n, const uint32_t(&raw)[8]) {
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        if (j < n) {
          uint32_t k;
          if (L::is_nan(raw[j])) {
            k = 0xffffffffu;
          } else {
            // -0 and +0 compare equal in torch: give them one key so the first index wins.
            const bool neg_zero = L::kBits == 16 ? raw[j] == 0x8000u : raw[j] == 0x80000000u;
            k = L::key(neg_zero ? 0u : raw[j]);
          }
          const unsigned long long packed =
              (static_cast<unsigned long long>(k) << 32) | (0xffffffffu - static_cast<uint32_t>(i0 + j));
          best = packed > best ? packed : best;
        }
      }
    });
    best = block_max_u64(best, s_u64);
    tok = static_cast<int>(0xffffffffu - static_cast<uint32_t>(best & 0xffffffffu));
  } else {
    const int top_k_v = s_top_k;
    const float top_p_v = s_top_p;

    // ---- max over non-NaN logits (as a key) -> max x = max logit / temperature.
    unsigned long long kmax = 0;
    visit_row<L>(row, V, S, vec, [&](int, int n, const uint32_t(&raw)[8]) {
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        if (j < n && !L::is_nan(raw[j])) {
          const unsigned long long k = L::key(raw[j]) + 1ull;  // 0 stays "nothing seen"
          kmax = k > kmax ? k : kmax;
        }
      }
    });
    kmax = block_max_u64(kmax, s_u64);
    const uint32_t max_key = kmax > 0 ? static_cast<uint32_t>(kmax - 1) : 0u;
    const float xmax = __fdiv_rn(L::key_value(max_key), temp);

    // ---- top-k: key of the k-th largest logit; keep x >= thr_x (ties kept).
    float thr_x = -INFINITY;
    if (top_k_v > 0 && top_k_v < V) {
      uint32_t prefix = 0;
      for (int bit = L::kBits - 1; bit >= 0; --bit) {
        const uint32_t cand = prefix | (1u << bit);
        int cnt = 0;
        visit_row<L>(row, V, S, vec, [&](int, int n, const uint32_t(&raw)[8]) {
#pragma unroll
          for (int j = 0; j < 8; ++j)
            cnt += (j < n && !L::is_nan(raw[j]) && L::key(raw[j]) >= cand) ? 1 : 0;
        });
        cnt = block_sum_int(cnt, s_int);
        if (cnt >= top_k_v) prefix = cand;  // uniform: every thread has the same cnt
      }
      thr_x = __fdiv_rn(L::key_value(prefix), temp);
    }

    // ---- top-p: radix descent, 4 key bits per pass, for the largest key c with S(c) >= need.
    float tau = 0.f;  // w >= 0 keeps everything
    if (top_p_v < 1.f) {
      if (tid == 0) {
        s_prefix = 0;
        s_above = 0.f;
        s_need = 0.f;
      }
      for (int level = 0; level < L::kBits / 4; ++level) {
        const int shift = L::kBits - 4 * (level + 1);
        __syncthreads();  // s_prefix of the previous level visible; s_acc / s_red free
        const uint32_t prefix = s_prefix;
        float acc[16];
#pragma unroll
        for (int d = 0; d < 16; ++d) acc[d] = 0.f;
        visit_row<L>(row, V, S, vec, [&](int, int n, const uint32_t(&raw)[8]) {
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            if (j < n && !L::is_nan(raw[j])) {
              const float x = __fdiv_rn(L::value(raw[j]), temp);
              const uint32_t k = L::key(raw[j]);
              if (x >= thr_x && (level == 0 || (k >> (shift + 4)) == prefix)) {
                const float w = expf(x - xmax);
                const uint32_t digit = (k >> shift) & 15u;
#pragma unroll
                for (int d = 0; d < 16; ++d) acc[d] += (digit >= static_cast<uint32_t>(d)) ? w : 0.f;
              }
            }
          }
        });
        // acc[d] = sum of w with this prefix and digit >= d; reduce over the block in fixed order.
#pragma unroll
        for (int d = 0; d < 16; ++d) acc[d] = warp_sum(acc[d]);
        if (lane == 0) {
#pragma unroll
          for (int d = 0; d < 16; ++d) s_acc[warp][d] = acc[d];
        }
        __syncthreads();
        if (tid < 16) {
          float r = 0.f;
          for (int w = 0; w < kSampleWarps; ++w) r += s_acc[w][tid];
          s_red[tid] = r;
        }
        __syncthreads();
        if (tid == 0) {
          const float above = s_above;
          if (level == 0) s_need = __fmul_rn(top_p_v, s_red[0]);  // s_red[0] = sum of all kept w
          const float need = s_need;
          int pick = 0;  // none reaches need (rounding, top_p ~ 1): lowest bucket keeps the most
          for (int d = 15; d >= 0; --d) {
            if (above + s_red[d] >= need) {
              pick = d;
              break;
            }
          }
          s_above = pick < 15 ? above + s_red[pick + 1] : above;
          s_prefix = (prefix << 4) | static_cast<uint32_t>(pick);
        }
      }
      __syncthreads();
      uint32_t c = s_prefix;
      if (c > max_key) c = max_key;  // top_p <= 0: need = 0 is met by every key; keep the max
      tau = expf(__fdiv_rn(L::key_value(c), temp) - xmax);
      // No bucket reached `need` at the top level (need > sum by rounding, top_p ~ 1): the descent
      // ends on key 0, a NaN pattern; like the reference's clamp, keep everything top-k kept.
      if (isnan(tau)) tau = 0.f;
    }

    // ---- draw: per-warp totals of kept w (the same rounds and scans the rescan below repeats).
    auto lane_weight = [&](int n, const uint32_t(&raw)[8], float (&w8)[8]) {
      float sum = 0.f;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        w8[j] = -1.f;  // not kept
        if (j < n && !L::is_nan(raw[j])) {
          const float x = __fdiv_rn(L::value(raw[j]), temp);
          if (x >= thr_x) {
            const float w = expf(x - xmax);
            if (w >= tau) {
              w8[j] = w;
              sum += w;
            }
          }
        }
      }
      return sum;
    };

    float warp_total = 0.f;
    int last_kept = -1;
    visit_row<L>(row, V, S, vec, [&](int i0, int n, const uint32_t(&raw)[8]) {
      float w8[8];
      const float ls = lane_weight(n, raw, w8);
#pragma unroll
      for (int j = 0; j < 8; ++j)
        if (w8[j] >= 0.f) last_kept = i0 + j;
      const float incl = warp_inclusive_scan(ls);
      warp_total += __shfl_sync(0xffffffffu, incl, 31);
    });
    last_kept = __reduce_max_sync(0xffffffffu, last_kept);
    if (lane == 0) {
      s_warp_total[warp] = warp_total;
      s_warp_last[warp] = last_kept;
    }
    __syncthreads();
    if (tid == 0) {
      const float u = uniform01(s_seed, s_pos);
      float prefix = 0.f;
      for (int w = 0; w < kSampleWarps; ++w) prefix += s_warp_total[w];
      const float target = __fmul_rn(u, prefix);  // u * sum(kept w)
      int cross = -1;
      float base = 0.f, run = 0.f;
      for (int w = 0; w < kSampleWarps; ++w) {
        const float next = run + s_warp_total[w];
        if (next > target) {
          cross = w;
          base = run;
          break;
        }
        run = next;
      }
      int last = -1;
      for (int w = 0; w < kSampleWarps; ++w) last = s_warp_last[w] > last ? s_warp_last[w] : last;
      s_cross_warp = cross;
      s_target = target;
      s_cross_base = base;
      // Default: no crossing (target rounded up to the total) -> the last kept index, as the
      // reference clamps; no kept element at all (all NaN) -> 0.
      s_tok = cross >= 0 ? (s_warp_last[cross] >= 0 ? s_warp_last[cross] : 0) : (last >= 0 ? last : 0);
    }
    __syncthreads();

    // ---- the crossing warp rescans its segment to find the exact index.
    if (warp == s_cross_warp) {
      const float target = s_target;
      float running = s_cross_base;
      bool found = false;
      visit_row<L>(row, V, S, vec, [&](int i0, int n, const uint32_t(&raw)[8]) {
        if (found) return;  // warp-uniform
        float w8[8];
        const float ls = lane_weight(n, raw, w8);
        const float incl = warp_inclusive_scan(ls);
        const float round_total = __shfl_sync(0xffffffffu, incl, 31);
        if (running + round_total > target) {
          const unsigned hit = __ballot_sync(0xffffffffu, running + incl > target);
          const int hl = __ffs(hit) - 1;  // hit != 0: lane 31's incl is round_total
          if (lane == hl) {
            const float excl = incl - ls;
            float r = running + excl;
            int pick = -1, last = -1;
#pragma unroll
            for (int j = 0; j < 8; ++j) {
              if (w8[j] >= 0.f) {
                last = i0 + j;
                r += w8[j];
                if (pick < 0 && r > target) pick = i0 + j;
              }
            }
            // Rounding can leave r <= target: fall back to the lane's last kept index.
            s_tok = pick >= 0 ? pick : (last >= 0 ? last : s_tok);
          }
          found = true;
        } else {
          running += round_total;
        }
      });
    }
    __syncthreads();
    tok = s_tok;
  }

  if (tid == 0) {
    const int pos = s_pos;
    token_in[b] = tok;
    if (pos + 1 >= 0 && pos + 1 < hist_len) token_hist[static_cast<int64_t>(b) * hist_len + pos + 1] = tok;
    positions[b] = pos + 1;
  }
}


// ============================================================================= histogram kernel

constexpr int kHistKeys = 1 << 16;                         // every 16-bit key
constexpr int kHistWords = kHistKeys / 2;                  // two 16-bit counters a word
constexpr int kChunkKeys = 16;                             // keys a chunk (8 words, 2 x 16 B)
constexpr int kChunks = kHistKeys / kChunkKeys;            // 4096
constexpr int kChunksPerThread = kChunks / kSampleThreads; // 4: a thread's group of 64 keys
// Largest V the histogram kernel takes: a key's count must fit its 16-bit counter, and a warp's
// segment (ceil(V / 32) rounded up to 256) at most kMaxRounds rounds.
constexpr int kHistMaxV = 65535;
constexpr int kMaxRounds = 8;
// Dynamic shared memory: the histogram (128 KB; later the staged row, [kMaxRounds][1024] x 16 B),
// then an fp32/int32 area of [kMaxRounds][1024] (chunk totals, later per-lane round sums).
constexpr size_t kHistSmem = static_cast<size_t>(kHistWords) * 4 +
                             static_cast<size_t>(kMaxRounds) * kSampleThreads * 4;
static_assert(kHistWords * 4 == kMaxRounds * kSampleThreads * 16, "staged row reuses the histogram");
static_assert(kChunks <= kMaxRounds * kSampleThreads, "chunk totals fit the fp32 area");

// 8 raw 16-bit logits starting at i0 (n valid, the rest 0), packed two a word like a 16-byte load.
__device__ __forceinline__ uint4 load_pack8(const uint16_t* row, int i0, int n, bool vec) {
  if (n <= 0) return make_uint4(0u, 0u, 0u, 0u);  // no load past the segment (or the row)
  if (vec) return ld16(row + i0);
  uint32_t h[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) h[j] = j < n ? static_cast<uint32_t>(row[i0 + j]) : 0u;
  return make_uint4(h[0] | (h[1] << 16), h[2] | (h[3] << 16), h[4] | (h[5] << 16),
                    h[6] | (h[7] << 16));
}

__device__ __forceinline__ void unpack_raw8(const uint4& v, uint32_t (&raw)[8]) {
  raw[0] = v.x & 0xffffu; raw[1] = v.x >> 16;
  raw[2] = v.y & 0xffffu; raw[3] = v.y >> 16;
  raw[4] = v.z & 0xffffu; raw[5] = v.z >> 16;
  raw[6] = v.w & 0xffffu; raw[7] = v.w >> 16;
}

// The 16 counters of chunk c (keys 16 c .. 16 c + 15) from the packed histogram.
__device__ __forceinline__ void chunk_counts(const uint4* hist4, int c, uint32_t (&n)[16]) {
  const uint4 a = hist4[2 * c], b = hist4[2 * c + 1];
  const uint32_t w[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
  for (int q = 0; q < 8; ++q) {
    n[2 * q] = w[q] & 0xffffu;
    n[2 * q + 1] = w[q] >> 16;
  }
}

// The counter of one key.
__device__ __forceinline__ uint32_t key_count(const uint32_t* hist, uint32_t k) {
  return (hist[k >> 1] >> ((k & 1u) * 16u)) & 0xffffu;
}

// x and w of a key, with exactly the operations the per-element tests use (key_value(key(r)) is
// the value of r, bit for bit).
template <typename L>
__device__ __forceinline__ float key_x(uint32_t k, float temp) {
  return __fdiv_rn(L::key_value(k), temp);
}
template <typename L>
__device__ __forceinline__ float key_w(uint32_t k, float temp, float xmax) {
  return expf(key_x<L>(k, temp) - xmax);
}

// Smallest key in [a, b] where `pred` holds, for a predicate that is false..false true..true on
// [a, b] and true at b. One evaluation when b - 1 already fails (the usual case: no two keys give
// the same x or w), else a binary search. Scalar: one thread.
template <typename F>
__device__ __forceinline__ uint32_t lowest_true(uint32_t a, uint32_t b, F&& pred) {
  if (b == a || !pred(b - 1)) return b;
  uint32_t lo = a, hi = b - 1;  // pred(hi)
  while (lo < hi) {
    const uint32_t mid = lo + (hi - lo) / 2;
    if (pred(mid)) hi = mid;
    else lo = mid + 1;
  }
  return lo;
}

// Block-wide exclusive suffix sum over threads (thread t gets the sum over threads > t) and the
// total. Fixed association: a Hillis-Steele suffix scan in each warp, the same over the 32 warp
// totals, then (warps above) + (lanes above). buf: __shared__ T[65]. Callers separate two uses of
// one buf by a barrier.
template <typename T>
__device__ __forceinline__ T block_suffix_excl(T v, T* buf, T* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  T incl = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const T other = __shfl_down_sync(0xffffffffu, incl, o);
    if (lane + o < 32) incl = incl + other;
  }
  T excl = __shfl_down_sync(0xffffffffu, incl, 1);
  if (lane == 31) excl = T(0);
  if (lane == 0) buf[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    T wi = buf[lane];
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const T other = __shfl_down_sync(0xffffffffu, wi, o);
      if (lane + o < 32) wi = wi + other;
    }
    T we = __shfl_down_sync(0xffffffffu, wi, 1);
    if (lane == 31) we = T(0);
    buf[32 + lane] = we;
    if (lane == 0) buf[64] = wi;
  }
  __syncthreads();
  *total = buf[64];
  return buf[32 + warp] + excl;
}

// Block max of ints (every thread gets it). buf: __shared__ int[32].
__device__ __forceinline__ int block_max_int(int v, int* buf) {
  v = __reduce_max_sync(0xffffffffu, v);
  __syncthreads();
  if ((threadIdx.x & 31) == 0) buf[threadIdx.x >> 5] = v;
  __syncthreads();
  int r = buf[0];
  for (int i = 1; i < kSampleWarps; ++i) r = buf[i] > r ? buf[i] : r;
  return r;
}

constexpr uint32_t kNoKey = 0xffffffffu;

// grid B, block kSampleThreads, dynamic shared memory kHistSmem. L: LogitBF16 or LogitFP16.
template <typename L>
__global__ void __launch_bounds__(kSampleThreads, 1)
sample_hist_kernel(const uint16_t* logits,      // [B, V]
                   const float* temperature,    // [B]
                   const int32_t* top_k,        // [B]
                   const float* top_p,          // [B]
                   const int64_t* seed,         // [B]
                   int32_t* positions,          // [B] in/out
                   int32_t* token_in,           // [B] out
                   int32_t* token_hist,         // [B, hist_len] out
                   int V, int hist_len, bool vec) {
  extern __shared__ uint4 s_dyn[];
  uint32_t* s_hist = reinterpret_cast<uint32_t*>(s_dyn);           // [kHistWords] packed counts
  uint4* s_stage = s_dyn;                                           // [kMaxRounds][1024] (draw)
  float* s_f = reinterpret_cast<float*>(s_hist + kHistWords);      // [kMaxRounds * 1024]
  int* s_i = reinterpret_cast<int*>(s_f);                           // the same area, as ints

  __shared__ int s_pos;
  __shared__ float s_temp, s_top_p;
  __shared__ int s_top_k;
  __shared__ long long s_seed;
  __shared__ unsigned long long s_u64[32];
  __shared__ int s_int[32];
  __shared__ int s_scan_i[65];
  __shared__ float s_scan_f[65];
  __shared__ uint32_t s_kth, s_lo, s_keep_lo;
  __shared__ float s_thr_x, s_tau, s_group_base;
  __shared__ float s_warp_total[kSampleWarps];
  __shared__ int s_warp_last[kSampleWarps];
  __shared__ int s_cross_warp;
  __shared__ float s_target, s_cross_base;
  __shared__ int s_tok;

  pdl_begin();
  const int b = blockIdx.x;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const uint16_t* row = logits + static_cast<int64_t>(b) * V;
  const int S = ceil_div(ceil_div(V, kSampleWarps), kRound) * kRound;  // <= kMaxRounds rounds
  const int seg0 = warp * S;
  const int seg1 = min(seg0 + S, V);
  // Elements of round r this lane owns (0 past the end of the segment); warp-uniform per round.
  auto lane_i0 = [&](int r) { return seg0 + r * kRound + lane * 8; };
  auto lane_n = [&](int r) {
    const int i0 = lane_i0(r);
    return seg0 + r * kRound < seg1 && i0 < seg1 ? min(8, seg1 - i0) : 0;
  };

  // ---- pass 1: the whole row into registers, every load in flight at once (issued before the
  // parameters arrive, so the two latencies overlap; a padding row just drops them).
  uint4 pk[kMaxRounds];
#pragma unroll
  for (int r = 0; r < kMaxRounds; ++r) pk[r] = load_pack8(row, lane_i0(r), lane_n(r), vec);

  if (tid == 0) {
    s_pos = positions[b];  // read once: incremented at the very end
    s_temp = temperature[b];
    s_top_k = top_k[b];
    s_top_p = top_p[b];
    s_seed = seed[b];
    s_kth = kNoKey;
  }
  __syncthreads();
  if (s_pos < 0) return;  // padding row: nothing written (block-uniform exit)
  const float temp = s_temp;
  int tok = 0;

  if (!(temp >= kGreedyTemperature)) {
    // ---- greedy: first index of the max (NaN counts as the max, like torch.argmax).
    unsigned long long best = 0;
#pragma unroll
    for (int r = 0; r < kMaxRounds; ++r) {
      const int i0 = lane_i0(r), n = lane_n(r);
      uint32_t raw[8];
      unpack_raw8(pk[r], raw);
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        if (j < n) {
          // -0 and +0 compare equal in torch: one key, so the first index wins.
          const uint32_t k = L::is_nan(raw[j]) ? 0xffffffffu : L::key(raw[j] == 0x8000u ? 0u : raw[j]);
          const unsigned long long packed = (static_cast<unsigned long long>(k) << 32) |
                                            (0xffffffffu - static_cast<uint32_t>(i0 + j));
          best = packed > best ? packed : best;
        }
      }
    }
    best = block_max_u64(best, s_u64);
    tok = static_cast<int>(0xffffffffu - static_cast<uint32_t>(best & 0xffffffffu));
  } else {
    const int top_k_v = s_top_k;
    const float top_p_v = s_top_p;
    const uint32_t kmin = L::key(L::kNegInf);  // keys of non-NaN values: [kmin, key(+inf)]

    // ---- histogram of non-NaN keys and their max (zeroing overlaps the loads in flight).
    const uint4 zero4 = make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
    for (int q = 0; q < kHistWords / 4 / kSampleThreads; ++q) s_dyn[q * kSampleThreads + tid] = zero4;
    __syncthreads();
    unsigned long long kmax1 = 0;  // key + 1; 0: nothing seen
#pragma unroll
    for (int r = 0; r < kMaxRounds; ++r) {
      const int n = lane_n(r);
      uint32_t raw[8];
      unpack_raw8(pk[r], raw);
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        if (j < n && !L::is_nan(raw[j])) {
          const uint32_t k = L::key(raw[j]);
          atomicAdd(s_hist + (k >> 1), 1u << ((k & 1u) * 16u));
          kmax1 = k + 1ull > kmax1 ? k + 1ull : kmax1;
        }
      }
    }
    kmax1 = block_max_u64(kmax1, s_u64);  // its barriers also publish the histogram
    const bool any = kmax1 > 0;             // block-uniform
    const uint32_t max_key = any ? static_cast<uint32_t>(kmax1 - 1) : 0u;
    const float xmax = __fdiv_rn(L::key_value(max_key), temp);
    const uint4* hist4 = s_dyn;

    // ---- top-k: the exact key of the k-th largest non-NaN logit.
    uint32_t lo = kmin;  // smallest key kept so far
    float thr_x = -INFINITY;
    bool none = !any;  // nothing kept: all NaN, or fewer than k non-NaN (as the bitwise search)
    if (any && top_k_v > 0 && top_k_v < V) {
#pragma unroll
      for (int q = 0; q < kChunksPerThread; ++q) {
        const int c = q * kSampleThreads + tid;  // strided: dense key ranges spread over warps
        uint32_t n[16];
        chunk_counts(hist4, c, n);
        int cnt = 0;
#pragma unroll
        for (int j = 0; j < 16; ++j) cnt += static_cast<int>(n[j]);
        s_i[c] = cnt;
      }
      __syncthreads();
      // Thread t's group: chunks 4t .. 4t + 3 (keys 64t .. 64t + 63).
      const int c0 = tid * kChunksPerThread;
      int g = 0;
#pragma unroll
      for (int q = 0; q < kChunksPerThread; ++q) g += s_i[c0 + q];
      int total = 0;
      const int above = block_suffix_excl(g, s_scan_i, &total);  // count of keys above the group
      if (above < top_k_v && top_k_v <= above + g) {  // exactly one thread: the crossing group
        int run = above;
        for (int c = c0 + kChunksPerThread - 1; c >= c0; --c) {
          if (run + s_i[c] >= top_k_v) {
            for (int j = kChunkKeys - 1; j >= 0; --j) {
              const uint32_t k = static_cast<uint32_t>(c * kChunkKeys + j);
              run += static_cast<int>(key_count(s_hist, k));
              if (run >= top_k_v) {
                s_kth = k;
                break;
              }
            }
            break;
          }
          run += s_i[c];
        }
      }
      __syncthreads();
      const uint32_t kth = s_kth;
      if (kth == kNoKey) {
        none = true;
      } else {
        if (tid == 0) {
          const float thr = key_x<L>(kth, temp);
          s_thr_x = thr;
          // Keys below the k-th whose x still equals thr_x (overflow, underflow, -0) are kept.
          s_lo = lowest_true(kmin, kth, [&](uint32_t k) { return key_x<L>(k, temp) >= thr; });
        }
        __syncthreads();
        thr_x = s_thr_x;
        lo = s_lo;
      }
    }

    // ---- top-p: c = the largest key with S(c) >= need, over keys [lo, max_key].
    float tau = 0.f;        // w >= 0 keeps everything
    uint32_t keep_lo = lo;  // smallest key that can be kept
    if (!none && top_p_v < 1.f) {
      // Mass of a key: n(key) * w(key) inside [lo, max_key], else 0.
      auto key_mass = [&](uint32_t k, uint32_t n) {
        return (n != 0u && k >= lo && k <= max_key) ? __fmul_rn(static_cast<float>(n), key_w<L>(k, temp, xmax))
                                                     : 0.f;
      };
      // Chunk masses, keys in descending order (skipping zero masses changes no sum).
#pragma unroll
      for (int q = 0; q < kChunksPerThread; ++q) {
        const int c = q * kSampleThreads + tid;
        const uint32_t k0 = static_cast<uint32_t>(c * kChunkKeys);
        float m = 0.f;
        if (k0 + kChunkKeys - 1 >= lo && k0 <= max_key) {
          uint32_t n[16];
          chunk_counts(hist4, c, n);
#pragma unroll
          for (int j = 15; j >= 0; --j)
            if (n[j] != 0u) m += key_mass(k0 + j, n[j]);
        }
        s_f[c] = m;
      }
      __syncthreads();
      const int c0 = tid * kChunksPerThread;
      float g = 0.f;
      for (int c = c0 + kChunksPerThread - 1; c >= c0; --c) g += s_f[c];
      float total = 0.f;
      const float base = block_suffix_excl(g, s_scan_f, &total);  // mass of the groups above
      const float need = __fmul_rn(top_p_v, total);
      // S at the group's lowest key: base, then its chunks from the top.
      float run = base;
      for (int c = c0 + kChunksPerThread - 1; c >= c0; --c) run += s_f[c];
      // The crossing group: the highest one whose lowest key reaches need.
      const int tstar = block_max_int(run >= need ? tid : -1, s_int);
      if (tid == tstar) s_group_base = base;
      __syncthreads();
      if (warp == 0) {
        uint32_t c_key = lo;  // no group reaches need (rounding): keep all that top-k kept
        if (tstar >= 0) {
          // Warp-uniform walk: the chunk, then its keys (16 lanes compute one key's mass each).
          const int g0 = tstar * kChunksPerThread;
          float r0 = s_group_base;
          int cs = g0;
          for (int c = g0 + kChunksPerThread - 1; c >= g0; --c) {
            if (r0 + s_f[c] >= need) {
              cs = c;
              break;
            }
            r0 += s_f[c];
          }
          const uint32_t k0 = static_cast<uint32_t>(cs * kChunkKeys);
          float my_m = 0.f;  // lane j < 16: the mass of key k0 + 15 - j
          if (lane < kChunkKeys) {
            const uint32_t k = k0 + kChunkKeys - 1 - lane;
            my_m = key_mass(k, key_count(s_hist, k));
          }
          // The chunk's sum so far, with the additions of its chunk mass (adding a zero mass
          // there was skipped; here it changes nothing).
          float part = 0.f;
          uint32_t found = k0;
          for (int j = 0; j < kChunkKeys; ++j) {
            part += __shfl_sync(0xffffffffu, my_m, j);
            if (r0 + part >= need) {
              found = k0 + 15 - j;
              break;
            }
          }
          c_key = found;
        }
        c_key = min(max(c_key, lo), max_key);
        if (lane == 0) {
          float t = key_w<L>(c_key, temp, xmax);
          uint32_t klo = lo;
          if (isnan(t)) {
            t = 0.f;  // like the reference's clamp: keep everything top-k kept
          } else {
            klo = lowest_true(lo, c_key, [&](uint32_t k) { return key_w<L>(k, temp, xmax) >= t; });
          }
          s_tau = t;
          s_keep_lo = klo;
        }
      }
      __syncthreads();
      tau = s_tau;
      keep_lo = s_keep_lo;
    }

    // ---- pass 2, the draw: the row again (L2), staged in shared memory for the rescan.
    __syncthreads();  // the histogram and the fp32 area are free
#pragma unroll
    for (int r = 0; r < kMaxRounds; ++r) pk[r] = load_pack8(row, lane_i0(r), none ? 0 : lane_n(r), vec);

    // w of the 8 elements (-1: not kept) and their sum in index order; the tests of sample_kernel.
    auto lane_weight = [&](int n, const uint32_t(&raw)[8], float (&w8)[8]) {
      float sum = 0.f;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        w8[j] = -1.f;
        if (j < n && !L::is_nan(raw[j]) && L::key(raw[j]) >= keep_lo) {
          const float x = __fdiv_rn(L::value(raw[j]), temp);
          if (x >= thr_x) {
            const float w = expf(x - xmax);
            if (w >= tau) {
              w8[j] = w;
              sum += w;
            }
          }
        }
      }
      return sum;
    };

    // Stage first (the registers of the loads die here), then work from shared memory.
#pragma unroll
    for (int r = 0; r < kMaxRounds; ++r)
      if (seg0 + r * kRound < seg1) s_stage[r * kSampleThreads + tid] = pk[r];
    float warp_total = 0.f;
    int last_kept = -1;
    if (!none) {
#pragma unroll 1
      for (int r = 0; r < kMaxRounds; ++r) {
        if (seg0 + r * kRound < seg1) {  // warp-uniform
          const int i0 = lane_i0(r), n = lane_n(r);
          uint32_t raw[8];
          unpack_raw8(s_stage[r * kSampleThreads + tid], raw);
          float w8[8];
          const float ls = lane_weight(n, raw, w8);
          s_f[r * kSampleThreads + tid] = ls;
#pragma unroll
          for (int j = 0; j < 8; ++j)
            if (w8[j] >= 0.f) last_kept = i0 + j;
          const float incl = warp_inclusive_scan(ls);
          warp_total += __shfl_sync(0xffffffffu, incl, 31);
        }
      }
    }
    last_kept = __reduce_max_sync(0xffffffffu, last_kept);
    if (lane == 0) {
      s_warp_total[warp] = warp_total;
      s_warp_last[warp] = last_kept;
    }
    __syncthreads();
    if (tid == 0) {
      const float u = uniform01(s_seed, s_pos);
      float prefix = 0.f;
      for (int w = 0; w < kSampleWarps; ++w) prefix += s_warp_total[w];
      const float target = __fmul_rn(u, prefix);  // u * sum(kept w)
      int cross = -1;
      float base = 0.f, run = 0.f;
      for (int w = 0; w < kSampleWarps; ++w) {
        const float next = run + s_warp_total[w];
        if (next > target) {
          cross = w;
          base = run;
          break;
        }
        run = next;
      }
      int last = -1;
      for (int w = 0; w < kSampleWarps; ++w) last = s_warp_last[w] > last ? s_warp_last[w] : last;
      s_cross_warp = cross;
      s_target = target;
      s_cross_base = base;
      // No crossing (target rounded up to the total) -> the last kept index, as the reference
      // clamps; nothing kept -> 0.
      s_tok = cross >= 0 ? (s_warp_last[cross] >= 0 ? s_warp_last[cross] : 0) : (last >= 0 ? last : 0);
    }
    __syncthreads();

    // ---- the crossing warp: the round, the lane, then the element (all in shared memory).
    if (warp == s_cross_warp) {
      const float target = s_target;
      float running = s_cross_base;
      for (int r = 0; r < kMaxRounds && seg0 + r * kRound < seg1; ++r) {
        const float ls = s_f[r * kSampleThreads + tid];
        const float incl = warp_inclusive_scan(ls);
        const float round_total = __shfl_sync(0xffffffffu, incl, 31);
        if (running + round_total > target) {
          const unsigned hit = __ballot_sync(0xffffffffu, running + incl > target);
          const int hl = __ffs(hit) - 1;  // hit != 0: lane 31's incl is round_total
          if (lane == hl) {
            uint32_t raw[8];
            unpack_raw8(s_stage[r * kSampleThreads + tid], raw);
            float w8[8];
            lane_weight(lane_n(r), raw, w8);
            float acc = running + (incl - ls);
            int pick = -1, last = -1;
#pragma unroll
            for (int j = 0; j < 8; ++j) {
              if (w8[j] >= 0.f) {
                last = lane_i0(r) + j;
                acc += w8[j];
                if (pick < 0 && acc > target) pick = lane_i0(r) + j;
              }
            }
            // Rounding can leave acc <= target: fall back to the lane's last kept index.
            s_tok = pick >= 0 ? pick : (last >= 0 ? last : s_tok);
          }
          break;
        }
        running += round_total;
      }
    }
    __syncthreads();
    tok = s_tok;
  }

  if (tid == 0) {
    const int pos = s_pos;
    token_in[b] = tok;
    if (pos + 1 >= 0 && pos + 1 < hist_len) token_hist[static_cast<int64_t>(b) * hist_len + pos + 1] = tok;
    positions[b] = pos + 1;
  }
}

// Lets sample_hist_kernel<L> use kHistSmem of dynamic shared memory on the current device, once
// per device (the attribute is per device; the first launch, normally a warm-up outside graph
// capture, sets it). *ok = false where the device cannot give that much (then the general kernel
// runs). The cache holds only what the device answered, never changes it.
template <typename L>
cudaError_t hist_kernel_ready(bool* ok) {
  constexpr int kMaxDevices = 64;
  static std::atomic<uint64_t> ready{0}, unable{0};  // one bit per device
  int dev = 0;
  CK_CUDA_TRY(cudaGetDevice(&dev));
  if (dev < 0 || dev >= kMaxDevices) {
    *ok = false;
    return cudaSuccess;
  }
  const uint64_t bit = 1ull << dev;
  if (ready.load(std::memory_order_acquire) & bit) {
    *ok = true;
    return cudaSuccess;
  }
  if (unable.load(std::memory_order_acquire) & bit) {
    *ok = false;
    return cudaSuccess;
  }
  int optin = 0;
  CK_CUDA_TRY(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  cudaFuncAttributes fa{};
  CK_CUDA_TRY(cudaFuncGetAttributes(&fa, sample_hist_kernel<L>));
  if (static_cast<size_t>(optin) < kHistSmem + fa.sharedSizeBytes) {
    unable.fetch_or(bit, std::memory_order_acq_rel);
    *ok = false;
    return cudaSuccess;
  }
  CK_CUDA_TRY(cudaFuncSetAttribute(sample_hist_kernel<L>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                   static_cast<int>(kHistSmem)));
  ready.fetch_or(bit, std::memory_order_acq_rel);
  *ok = true;
  return cudaSuccess;
}

// The histogram kernel for 16-bit logits when it fits (V, shared memory), else the general one.
template <typename L>
cudaError_t launch_sample_16(const uint16_t* logits, const float* temperature, const int32_t* top_k,
                             const float* top_p, const int64_t* seed, int32_t* positions,
                             int32_t* token_in, int32_t* token_hist, int B, int V, int hist_len,
                             bool vec, cudaStream_t stream) {
  bool hist = false;
  if (V <= kHistMaxV) CK_CUDA_TRY(hist_kernel_ready<L>(&hist));
  if (hist) {
    CK_LAUNCH(sample_hist_kernel<L>, dim3(B), dim3(kSampleThreads), kHistSmem, stream, logits,
              temperature, top_k, top_p, seed, positions, token_in, token_hist, V, hist_len, vec);
  } else {
    CK_LAUNCH(sample_kernel<L>, dim3(B), dim3(kSampleThreads), 0, stream, logits, temperature,
              top_k, top_p, seed, positions, token_in, token_hist, V, hist_len, vec);
  }
  return cudaSuccess;
}

}  // namespace

cudaError_t launch_sample(const void* logits, const float* temperature, const int32_t* top_k,
                          const float* top_p, const int64_t* seed, int32_t* positions,
                          int32_t* token_in, int32_t* token_hist, int B, int V, int hist_len,
                          DType logits_dt, cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  if (B < 0 || V <= 0 || hist_len <= 0) return cudaErrorInvalidValue;
  const bool vec = V % 8 == 0 && aligned16(logits);
  switch (logits_dt) {
    case DType::BF16:
      CK_CUDA_TRY(launch_sample_16<LogitBF16>(static_cast<const uint16_t*>(logits), temperature,
                                              top_k, top_p, seed, positions, token_in, token_hist,
                                              B, V, hist_len, vec, stream));
      break;
    case DType::FP16:
      CK_CUDA_TRY(launch_sample_16<LogitFP16>(static_cast<const uint16_t*>(logits), temperature,
                                              top_k, top_p, seed, positions, token_in, token_hist,
                                              B, V, hist_len, vec, stream));
      break;
    case DType::FP32:
      CK_LAUNCH(sample_kernel<LogitFP32>, dim3(B), dim3(kSampleThreads), 0, stream,
                static_cast<const uint32_t*>(logits), temperature, top_k, top_p, seed, positions,
                token_in, token_hist, V, hist_len, vec);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  CK_RETURN_LAUNCH_STATUS();
}

}  // namespace ck
