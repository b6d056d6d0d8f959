// Demo backward, dQ: dq = scale * dS k, dS = P * (dP - delta), dP = dout v^T.
//
// Grid: one threadgroup per (query tile of BQ rows, query head, batch), with
// BQ / 8 SIMD groups; SIMD group g owns query rows [8g, 8g + 8) of the tile:
// its q and dout fragments and its dq accumulator stay in registers. The
// threadgroup walks the key tiles (none above the causal diagonal), staging
// each K and V tile once in threadgroup memory for all SIMD groups. Each
// query row is written by exactly one lane: no atomics, deterministic.
//
// Template constants: T, D, BQ, BK, MASK as in demo_forward.metal.
//
// Inputs:  q, k, v, mask_array, params, fparams as in demo_forward.metal;
//          dout (B, Hq, Lq, D) in T, any strides; lse (B, Hq, Lq) float32
//          from the forward (log2 units) and delta (B, Hq, Lq) float32,
//          rowsum(dout * out), both row-contiguous.
// Outputs: dq (B, Hq, Lq, D) in T.

constexpr int NSG = BQ / 8;
constexpr int NT = NSG * 32;
constexpr int LD = D + DEMO_PAD;
constexpr int DF = D / 8;
constexpr int KF = BK / 8;
constexpr int TILE_ROWS = (BQ > BK) ? 2 * BQ : 2 * BK;

// Q and dout are staged here once, then the space holds the K and V tiles.
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
const float inv_k_len = 1.0f / float(k_len);

const int64_t q_base = batch * q_strides[0] + head * q_strides[1];
const int64_t do_base = batch * dout_strides[0] + head * dout_strides[1];
const int64_t k_base = batch * k_strides[0] + kv_head * k_strides[1];
const int64_t v_base = batch * v_strides[0] + kv_head * v_strides[1];
const size_t row_offset = size_t(batch * n_q_heads + head) * q_len;

const short2 coord = demo_frag_coord(lane);
const int row = q_start + sg * 8 + coord.y;
const int col = coord.x;
const int safe_row = min(row, q_len - 1);
const int64_t mrow = batch * flash_axis_stride(mask_array_shape[0], mask_array_strides[0]) +
    head * flash_axis_stride(mask_array_shape[1], mask_array_strides[1]) +
    safe_row * flash_axis_stride(mask_array_shape[2], mask_array_strides[2]);
const int64_t msj = flash_axis_stride(mask_array_shape[3], mask_array_strides[3]);
const float row_lse = lse[row_offset + safe_row];
const float row_delta = delta[row_offset + safe_row];

// q and dout fragments, loaded once.
demo_stage<T, BQ, D, LD, NT>(smem, q + q_base, q_strides[2], q_strides[3], q_start, q_len, tid);
demo_stage<T, BQ, D, LD, NT>(
    smem + BQ * LD, dout + do_base, dout_strides[2], dout_strides[3], q_start, q_len, tid);
threadgroup_barrier(mem_flags::mem_threadgroup);
simdgroup_matrix<T, 8, 8> q_frag[DF];
simdgroup_matrix<T, 8, 8> do_frag[DF];
DEMO_UNROLL
for (int d = 0; d < DF; ++d) {
  simdgroup_load(q_frag[d], smem + (sg * 8) * LD + d * 8, LD);
  simdgroup_load(do_frag[d], smem + (BQ + sg * 8) * LD + d * 8, LD);
}

simdgroup_matrix<float, 8, 8> dq_acc[DF];
DEMO_UNROLL
for (int d = 0; d < DF; ++d) {
  dq_acc[d] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
}

int k_end = k_len;
if (MASK == DEMO_MASK_CAUSAL) {
  k_end = min(k_len, q_start + BQ + causal_offset);
}

for (int k_start = 0; k_start < k_end; k_start += BK) {
  threadgroup_barrier(mem_flags::mem_threadgroup);
  demo_stage<T, BK, D, LD, NT>(k_tile, k + k_base, k_strides[2], k_strides[3], k_start, k_len, tid);
  demo_stage<T, BK, D, LD, NT>(v_tile, v + v_base, v_strides[2], v_strides[3], k_start, k_len, tid);
  threadgroup_barrier(mem_flags::mem_threadgroup);

  // S = q K^T and dP = dout V^T: (8, D) x (D, BK) each.
  simdgroup_matrix<float, 8, 8> s[KF];
  simdgroup_matrix<float, 8, 8> dp[KF];
  DEMO_UNROLL
  for (int j = 0; j < KF; ++j) {
    s[j] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
    dp[j] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
  }
  DEMO_UNROLL
  for (int d = 0; d < DF; ++d) {
    DEMO_UNROLL
    for (int j = 0; j < KF; ++j) {
      simdgroup_matrix<T, 8, 8> k_t;
      simdgroup_matrix<T, 8, 8> v_t;
      simdgroup_load(k_t, k_tile + (j * 8) * LD + d * 8, LD, ulong2(0, 0), true);
      simdgroup_load(v_t, v_tile + (j * 8) * LD + d * 8, LD, ulong2(0, 0), true);
      simdgroup_multiply_accumulate(s[j], q_frag[d], k_t, s[j]);
      simdgroup_multiply_accumulate(dp[j], do_frag[d], v_t, dp[j]);
    }
  }

  // dS = P * (dP - delta), zero where a boolean or causal mask drops.
  simdgroup_matrix<T, 8, 8> ds[KF];
  DEMO_UNROLL
  for (int j = 0; j < KF; ++j) {
    DEMO_UNROLL
    for (int e = 0; e < 2; ++e) {
      const int key = k_start + j * 8 + col + e;
      const float s2 = demo_mask_score<MASK>(
          s[j].thread_elements()[e] * scale2,
          row,
          key,
          k_len,
          causal_offset,
          mask_array,
          mrow,
          msj);
      const float w = demo_weight(s2, row_lse, inv_k_len);
      const bool dropped =
          key >= k_len || demo_mask_drops<MASK>(row, key, causal_offset, mask_array, mrow, msj);
      ds[j].thread_elements()[e] = T(dropped ? 0.0f : w * (dp[j].thread_elements()[e] - row_delta));
    }
  }

  // dq += dS K: (8, BK) x (BK, D).
  DEMO_UNROLL
  for (int d = 0; d < DF; ++d) {
    DEMO_UNROLL
    for (int j = 0; j < KF; ++j) {
      simdgroup_matrix<T, 8, 8> k_frag;
      simdgroup_load(k_frag, k_tile + (j * 8) * LD + d * 8, LD);
      simdgroup_multiply_accumulate(dq_acc[d], ds[j], k_frag, dq_acc[d]);
    }
  }
}

if (row < q_len) {
  const float dq_scale = fparams[0];
  device T* dq_row = dq + (row_offset + row) * D;
  DEMO_UNROLL
  for (int d = 0; d < DF; ++d) {
    dq_row[d * 8 + col] = T(dq_acc[d].thread_elements()[0] * dq_scale);
    dq_row[d * 8 + col + 1] = T(dq_acc[d].thread_elements()[1] * dq_scale);
  }
}
