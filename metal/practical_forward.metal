// Practical flash-attention forward: O = softmax(scale * Q K^T + mask) V and
// the per-row log-sum-exp of the scores, one pass over the keys.
//
// Inputs:  q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, DV), any
//          strides; mask_array (rank 4, broadcastable to (B, Hq, Lq, Lk)), bool or
//          q's dtype, read only for FLASH_MASK_BOOL / FLASH_MASK_ADD;
//          params, fparams as in flash_common.h.
// Outputs: o (B, Hq, Lq, DV) in T, lse (B, Hq, Lq) float32.
// Grid:    threadgroup (NSG * 32, 1, 1) per (query tile, query head, batch).
//
// Template constants: T (output dtype), D, DV (head dims), NSG (simdgroups
// per threadgroup), R (query rows per simdgroup), BK (keys per tile, <= 32).
//
// Layout: a simdgroup owns R query rows; its 32 lanes split the head
// dimension, lane l holding elements l, l + 32, l + 64, ... of each row, so
// every device read is coalesced. The K and V tiles are staged in
// threadgroup memory once and shared by all NSG simdgroups. A score is a
// simd_sum of the lanes' partial dot products; lane j keeps the score of key
// j of the tile, so the tile's softmax statistics are one simd_max and one
// simd_sum per row.

constexpr int DPT = (D + 31) / 32; // head elements per lane
constexpr int DVPT = (DV + 31) / 32;
constexpr int DP = DPT * 32; // tile row length, zero padded
constexpr int DVP = DVPT * 32;
constexpr int BQ = NSG * R; // query rows per threadgroup
constexpr int NT = NSG * 32; // threads per threadgroup

threadgroup float k_tile[BK * DP];
threadgroup float v_tile[BK * DVP];

const int q_len = params[0];
const int k_len = params[1];
const int n_q_heads = params[2];
const int n_kv_heads = params[3];
const int mask_kind = params[4];
const float scale = fparams[0];
const float lowest = fparams[1];

const int tile = threadgroup_position_in_grid.x;
const int head = threadgroup_position_in_grid.y;
const int batch = threadgroup_position_in_grid.z;
const int kv_head = head / (n_q_heads / n_kv_heads);
const int tid = thread_index_in_threadgroup;
const int lane = thread_index_in_simdgroup;
const int first_row = tile * BQ + simdgroup_index_in_threadgroup * R;

const int64_t q_base = batch * q_strides[0] + head * q_strides[1];
const int64_t k_base = batch * k_strides[0] + kv_head * k_strides[1];
const int64_t v_base = batch * v_strides[0] + kv_head * v_strides[1];
const int64_t mask_base =
    batch * flash_axis_stride(mask_array_shape[0], mask_array_strides[0]) +
    head * flash_axis_stride(mask_array_shape[1], mask_array_strides[1]);
const int64_t mask_row_stride = flash_axis_stride(mask_array_shape[2], mask_array_strides[2]);
const int64_t mask_key_stride = flash_axis_stride(mask_array_shape[3], mask_array_strides[3]);

// Scaled query rows in registers; rows past q_len are zeros and never written.
float q_reg[R][DPT];
float o_acc[R][DVPT];
float row_max[R];
float row_sum[R];
for (int r = 0; r < R; ++r) {
  const int row = first_row + r;
  for (int t = 0; t < DPT; ++t) {
    const int d = t * 32 + lane;
    q_reg[r][t] = (row < q_len && d < D)
        ? scale * float(q[q_base + row * q_strides[2] + d * q_strides[3]])
        : 0.0f;
  }
  for (int t = 0; t < DVPT; ++t) {
    o_acc[r][t] = 0.0f;
  }
  row_max[r] = -INFINITY;
  row_sum[r] = 0.0f;
}

// Causal: keys past the diagonal of the tile's last row are never seen.
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

  // S = scale * Q K^T for this tile: lane j ends up with column j.
  float s[R];
  for (int r = 0; r < R; ++r) {
    s[r] = -INFINITY;
  }
  for (int j = 0; j < BK; ++j) {
    float k_reg[DPT];
    for (int t = 0; t < DPT; ++t) {
      k_reg[t] = k_tile[j * DP + t * 32 + lane];
    }
    for (int r = 0; r < R; ++r) {
      float partial = 0.0f;
      for (int t = 0; t < DPT; ++t) {
        partial += q_reg[r][t] * k_reg[t];
      }
      const float score = simd_sum(partial);
      if (lane == j) {
        s[r] = score;
      }
    }
  }

  // Mask, then the online softmax update of each row:
  //   m' = max(m, rowmax(S)), P = exp(S - m'),
  //   l' = l * exp(m - m') + rowsum(P), O' = O * exp(m - m') + P V.
  const int key = k0 + lane;
  for (int r = 0; r < R; ++r) {
    const int row = first_row + r;
    if (lane >= BK || key >= k_len) {
      s[r] = -INFINITY; // not a key: weight exactly 0
    } else if (row < q_len) {
      if (mask_kind == FLASH_MASK_CAUSAL) {
        s[r] = flash_causal_keeps(row, key, q_len, k_len) ? s[r] : lowest;
      } else if (mask_kind == FLASH_MASK_BOOL) {
        const bool keep = float(mask_array[mask_base + row * mask_row_stride +
                                     key * mask_key_stride]) != 0.0f;
        s[r] = keep ? s[r] : lowest;
      } else if (mask_kind == FLASH_MASK_ADD) {
        s[r] += float(
            mask_array[mask_base + row * mask_row_stride + key * mask_key_stride]);
      }
    }
    const float new_max = max(row_max[r], simd_max(s[r]));
    const float base = flash_exp_base(new_max);
    const float p = flash_exp(s[r] - base);
    const float correction = flash_exp(row_max[r] - base);
    row_sum[r] = row_sum[r] * correction + simd_sum(p);
    row_max[r] = new_max;
    s[r] = p;
    for (int t = 0; t < DVPT; ++t) {
      o_acc[r][t] *= correction;
    }
  }
  for (int j = 0; j < BK; ++j) {
    float v_reg[DVPT];
    for (int t = 0; t < DVPT; ++t) {
      v_reg[t] = v_tile[j * DVP + t * 32 + lane];
    }
    for (int r = 0; r < R; ++r) {
      const float p = simd_shuffle(s[r], ushort(j));
      for (int t = 0; t < DVPT; ++t) {
        o_acc[r][t] += p * v_reg[t];
      }
    }
  }
}

// O = O / l; lse = m + log(l). A row whose scores are all -inf (an additive
// mask of -inf) has l = 0 and gives NaN, as the reference does.
for (int r = 0; r < R; ++r) {
  const int row = first_row + r;
  if (row < q_len) {
    const int64_t stat = (int64_t(batch) * n_q_heads + head) * q_len + row;
    const float inv_sum = 1.0f / row_sum[r];
    for (int t = 0; t < DVPT; ++t) {
      const int d = t * 32 + lane;
      if (d < DV) {
        o[stat * DV + d] = static_cast<T>(o_acc[r][t] * inv_sum);
      }
    }
    if (lane == 0) {
      lse[stat] = row_max[r] + log(row_sum[r]);
    }
  }
}
