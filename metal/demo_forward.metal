// Demo forward: out = softmax(scale * q k^T + mask) v, one pass, O(L) memory.
//
// Grid: one threadgroup per (query tile of BQ rows, query head, batch), with
// BQ / 8 SIMD groups; SIMD group g owns query rows [8g, 8g + 8) of the tile
// from start to end: its Q fragments, its output accumulator and its softmax
// statistics stay in registers. The threadgroup walks the key tiles; each
// K and V tile is staged once in threadgroup memory and read by every SIMD
// group. Key tiles entirely above the causal diagonal are never visited.
//
// Template constants: T (half or bfloat), D (head dim of q, k and v), BQ
// (query rows per threadgroup, a multiple of 8), BK (keys per tile, a
// multiple of 8), MASK (DEMO_MASK_*).
//
// Inputs:  q (B, Hq, Lq, D), k and v (B, Hkv, Lk, D) in T, any strides;
//          mask_array: rank 4, broadcastable to (B, Hq, Lq, Lk), read through its
//          shape and strides (a placeholder when MASK is none or causal);
//          params int32 [Lq, Lk, Hq, Hkv]; fparams float32 [scale].
// Outputs: out (B, Hq, Lq, D) in T; lse (B, Hq, Lq) float32, the row's
//          log-sum-exp of the scaled, masked scores in log2 units.

constexpr int NSG = BQ / 8;
constexpr int NT = NSG * 32;
constexpr int LD = D + DEMO_PAD;
constexpr int DF = D / 8;   // fragments across the head dim
constexpr int KF = BK / 8;  // fragments across a key tile
constexpr int TILE_ROWS = (BQ > 2 * BK) ? BQ : 2 * BK;

// Q is staged here once, then the space holds the K tile and the V tile.
threadgroup T smem[TILE_ROWS * LD];
threadgroup T* k_tile = smem;
threadgroup T* v_tile = smem + BK * LD;

const uint tid = thread_index_in_threadgroup;
const ushort sg = simdgroup_index_in_threadgroup;
const ushort lane = thread_index_in_simdgroup;

const int q_len = params[0];
const int k_len = params[1];
const int n_q_heads = params[2];
const int n_kv_heads = params[3];
const int batch = threadgroup_position_in_grid.z;
const int head = threadgroup_position_in_grid.y;
const int q_start = threadgroup_position_in_grid.x * BQ;
const int kv_head = head / (n_q_heads / n_kv_heads);
const int causal_offset = k_len - q_len;
const float scale2 = fparams[0] * DEMO_LOG2E;

const int64_t q_base = batch * q_strides[0] + head * q_strides[1];
const int64_t k_base = batch * k_strides[0] + kv_head * k_strides[1];
const int64_t v_base = batch * v_strides[0] + kv_head * v_strides[1];

// This lane's row of the tile, and the first of its two columns in every
// fragment.
const short2 coord = demo_frag_coord(lane);
const int row = q_start + sg * 8 + coord.y;
const int col = coord.x;
// Rows past the end are computed but never stored; their mask reads use the
// last row so they stay in bounds.
const int64_t mrow = batch * flash_axis_stride(mask_array_shape[0], mask_array_strides[0]) +
    head * flash_axis_stride(mask_array_shape[1], mask_array_strides[1]) +
    min(row, q_len - 1) * flash_axis_stride(mask_array_shape[2], mask_array_strides[2]);
const int64_t msj = flash_axis_stride(mask_array_shape[3], mask_array_strides[3]);

// Q fragments, loaded once.
demo_stage<T, BQ, D, LD, NT>(smem, q + q_base, q_strides[2], q_strides[3], q_start, q_len, tid);
threadgroup_barrier(mem_flags::mem_threadgroup);
simdgroup_matrix<T, 8, 8> q_frag[DF];
DEMO_UNROLL
for (int d = 0; d < DF; ++d) {
  simdgroup_load(q_frag[d], smem + (sg * 8) * LD + d * 8, LD);
}

simdgroup_matrix<float, 8, 8> o_acc[DF];
DEMO_UNROLL
for (int d = 0; d < DF; ++d) {
  o_acc[d] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
}
float row_max = -INFINITY;
float row_sum = 0.0f;

// Causal: the last row of the tile sees keys up to q_start + BQ - 1 + offset.
int k_end = k_len;
if (MASK == DEMO_MASK_CAUSAL) {
  k_end = min(k_len, q_start + BQ + causal_offset);
}

for (int k_start = 0; k_start < k_end; k_start += BK) {
  // Everyone is done with Q (first tile) or the previous K/V tile.
  threadgroup_barrier(mem_flags::mem_threadgroup);
  demo_stage<T, BK, D, LD, NT>(k_tile, k + k_base, k_strides[2], k_strides[3], k_start, k_len, tid);
  demo_stage<T, BK, D, LD, NT>(v_tile, v + v_base, v_strides[2], v_strides[3], k_start, k_len, tid);
  threadgroup_barrier(mem_flags::mem_threadgroup);

  // S = Q K^T for this SIMD group's 8 rows: (8, D) x (D, BK).
  simdgroup_matrix<float, 8, 8> s[KF];
  DEMO_UNROLL
  for (int j = 0; j < KF; ++j) {
    s[j] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
  }
  DEMO_UNROLL
  for (int d = 0; d < DF; ++d) {
    DEMO_UNROLL
    for (int j = 0; j < KF; ++j) {
      simdgroup_matrix<T, 8, 8> k_t;
      simdgroup_load(k_t, k_tile + (j * 8) * LD + d * 8, LD, ulong2(0, 0), true);
      simdgroup_multiply_accumulate(s[j], q_frag[d], k_t, s[j]);
    }
  }

  // Scale, mask, and the tile's row max.
  float tile_max = -INFINITY;
  DEMO_UNROLL
  for (int j = 0; j < KF; ++j) {
    DEMO_UNROLL
    for (int e = 0; e < 2; ++e) {
      const float s2 = demo_mask_score<MASK>(
          s[j].thread_elements()[e] * scale2,
          row,
          k_start + j * 8 + col + e,
          k_len,
          causal_offset,
          mask_array,
          mrow,
          msj);
      s[j].thread_elements()[e] = s2;
      tile_max = max(tile_max, s2);
    }
  }
  const float new_max = max(row_max, demo_row_max(tile_max));
  // A row that has seen only -inf so far subtracts 0 instead of -inf, so its
  // weights are exp2(-inf) = 0 rather than NaN and later tiles still count.
  const float shift = (new_max == -INFINITY) ? 0.0f : new_max;
  const float correction = fast::exp2(row_max - shift);

  // P = exp2(S - max), rounded to T for the P V product.
  simdgroup_matrix<T, 8, 8> p[KF];
  float tile_sum = 0.0f;
  DEMO_UNROLL
  for (int j = 0; j < KF; ++j) {
    DEMO_UNROLL
    for (int e = 0; e < 2; ++e) {
      const float w = fast::exp2(s[j].thread_elements()[e] - shift);
      tile_sum += w;
      p[j].thread_elements()[e] = T(w);
    }
  }
  row_sum = row_sum * correction + demo_row_sum(tile_sum);
  row_max = new_max;

  // O = O * correction + P V: (8, BK) x (BK, D).
  DEMO_UNROLL
  for (int d = 0; d < DF; ++d) {
    o_acc[d].thread_elements()[0] *= correction;
    o_acc[d].thread_elements()[1] *= correction;
    DEMO_UNROLL
    for (int j = 0; j < KF; ++j) {
      simdgroup_matrix<T, 8, 8> v_frag;
      simdgroup_load(v_frag, v_tile + (j * 8) * LD + d * 8, LD);
      simdgroup_multiply_accumulate(o_acc[d], p[j], v_frag, o_acc[d]);
    }
  }
}

// A row of -inf scores has row_sum 0 and gives NaN, as MLX does.
if (row < q_len) {
  const float inv_sum = 1.0f / row_sum;
  device T* out_row = out + (size_t(batch * n_q_heads + head) * q_len + row) * D;
  DEMO_UNROLL
  for (int d = 0; d < DF; ++d) {
    out_row[d * 8 + col] = T(o_acc[d].thread_elements()[0] * inv_sum);
    out_row[d * 8 + col + 1] = T(o_acc[d].thread_elements()[1] * inv_sum);
  }
  if (col == 0) {
    lse[size_t(batch * n_q_heads + head) * q_len + row] = row_max + log2(row_sum);
  }
}
