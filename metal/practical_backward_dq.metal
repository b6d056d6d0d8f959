// Practical flash-attention backward, dQ (FlashAttention-2): a threadgroup
// owns a tile of query rows and walks the key tiles, accumulating in
// registers
//   P  = exp(scale * Q K^T + mask - lse)       (recomputed, never stored)
//   dS = P * (dO V^T - delta)
//   dQ += scale * dS K
// so dQ is written once, with no atomics and in a fixed order.
//
// Inputs, template constants and grid as practical_forward.metal, plus
// dout (B, Hq, Lq, DV) any strides and lse, delta (B, Hq, Lq) float32
// contiguous. Output: dq (B, Hq, Lq, D) in T.
//
// Layout: the forward's. A simdgroup owns R query rows (Q, dO and the dQ
// accumulator in registers, split over the lanes); K and V tiles are staged
// in threadgroup memory and shared; each (query, key) pair costs two
// simd_sums (S and dP).

constexpr int DPT = (D + 31) / 32;
constexpr int DVPT = (DV + 31) / 32;
constexpr int DP = DPT * 32;
constexpr int DVP = DVPT * 32;
constexpr int BQ = NSG * R;
constexpr int NT = NSG * 32;

threadgroup float k_tile[BK * DP];
threadgroup float v_tile[BK * DVP];

const int q_len = params[0];
const int k_len = params[1];
const int n_q_heads = params[2];
const int n_kv_heads = params[3];
const int mask_kind = params[4];
const float scale = fparams[0];

const int tile = threadgroup_position_in_grid.x;
const int head = threadgroup_position_in_grid.y;
const int batch = threadgroup_position_in_grid.z;
const int kv_head = head / (n_q_heads / n_kv_heads);
const int tid = thread_index_in_threadgroup;
const int lane = thread_index_in_simdgroup;
const int first_row = tile * BQ + simdgroup_index_in_threadgroup * R;

const int64_t q_base = batch * q_strides[0] + head * q_strides[1];
const int64_t do_base = batch * dout_strides[0] + head * dout_strides[1];
const int64_t k_base = batch * k_strides[0] + kv_head * k_strides[1];
const int64_t v_base = batch * v_strides[0] + kv_head * v_strides[1];
const int64_t mask_base =
    batch * flash_axis_stride(mask_array_shape[0], mask_array_strides[0]) +
    head * flash_axis_stride(mask_array_shape[1], mask_array_strides[1]);
const int64_t mask_row_stride = flash_axis_stride(mask_array_shape[2], mask_array_strides[2]);
const int64_t mask_key_stride = flash_axis_stride(mask_array_shape[3], mask_array_strides[3]);
const int64_t stat_base = (int64_t(batch) * n_q_heads + head) * q_len;

// Q is kept pre-scaled, so q_reg . k is already the score.
float q_reg[R][DPT];
float do_reg[R][DVPT];
float dq_acc[R][DPT];
float row_lse[R];
float row_delta[R];
for (int r = 0; r < R; ++r) {
  const int row = first_row + r;
  const bool valid = row < q_len;
  for (int t = 0; t < DPT; ++t) {
    const int d = t * 32 + lane;
    q_reg[r][t] = (valid && d < D)
        ? scale * float(q[q_base + row * q_strides[2] + d * q_strides[3]])
        : 0.0f;
    dq_acc[r][t] = 0.0f;
  }
  for (int t = 0; t < DVPT; ++t) {
    const int d = t * 32 + lane;
    do_reg[r][t] = (valid && d < DV)
        ? float(dout[do_base + row * dout_strides[2] + d * dout_strides[3]])
        : 0.0f;
  }
  row_lse[r] = valid ? lse[stat_base + row] : 0.0f;
  row_delta[r] = valid ? delta[stat_base + row] : 0.0f;
}

const int tile_row_end = min(tile * BQ + BQ, q_len);
const int key_end = (mask_kind == FLASH_MASK_CAUSAL)
    ? flash_causal_key_end(tile_row_end, q_len, k_len)
    : k_len;

for (int k0 = 0; k0 < key_end; k0 += BK) {
  // Every simdgroup is done with the previous tile before it is overwritten.
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (int i = tid; i < BK * DP; i += NT) {
    const int key = k0 + i / DP;
    const int d = i % DP;
    k_tile[i] = (key < k_len && d < D)
        ? float(k[k_base + key * k_strides[2] + d * k_strides[3]])
        : 0.0f;
  }
  for (int i = tid; i < BK * DVP; i += NT) {
    const int key = k0 + i / DVP;
    const int d = i % DVP;
    v_tile[i] = (key < k_len && d < DV)
        ? float(v[v_base + key * v_strides[2] + d * v_strides[3]])
        : 0.0f;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);

  const int keys = min(BK, k_len - k0);
  for (int j = 0; j < keys; ++j) {
    const int key = k0 + j;
    float k_row[DPT];
    float v_row[DVPT];
    for (int t = 0; t < DPT; ++t) {
      k_row[t] = k_tile[j * DP + t * 32 + lane];
    }
    for (int t = 0; t < DVPT; ++t) {
      v_row[t] = v_tile[j * DVP + t * 32 + lane];
    }
    for (int r = 0; r < R; ++r) {
      const int row = first_row + r;
      // Uniform over the simdgroup, so the simd_sums below stay convergent.
      if (row >= q_len) {
        continue;
      }
      float s_part = 0.0f;
      for (int t = 0; t < DPT; ++t) {
        s_part += q_reg[r][t] * k_row[t];
      }
      float dp_part = 0.0f;
      for (int t = 0; t < DVPT; ++t) {
        dp_part += do_reg[r][t] * v_row[t];
      }
      float s = simd_sum(s_part);
      const float dp = simd_sum(dp_part);

      bool keep = true;
      if (mask_kind == FLASH_MASK_CAUSAL) {
        keep = flash_causal_keeps(row, key, q_len, k_len);
      } else if (mask_kind == FLASH_MASK_BOOL) {
        keep = float(mask_array[mask_base + row * mask_row_stride +
                          key * mask_key_stride]) != 0.0f;
      } else if (mask_kind == FLASH_MASK_ADD) {
        s += float(
            mask_array[mask_base + row * mask_row_stride + key * mask_key_stride]);
      }
      // A dropped score is a constant: no gradient flows through it.
      const float p = keep ? flash_exp(s - row_lse[r]) : 0.0f;
      const float ds = p * (dp - row_delta[r]);
      for (int t = 0; t < DPT; ++t) {
        dq_acc[r][t] += ds * k_row[t];
      }
    }
  }
}

for (int r = 0; r < R; ++r) {
  const int row = first_row + r;
  if (row < q_len) {
    for (int t = 0; t < DPT; ++t) {
      const int d = t * 32 + lane;
      if (d < D) {
        dq[(stat_base + row) * D + d] = static_cast<T>(scale * dq_acc[r][t]);
      }
    }
  }
}
