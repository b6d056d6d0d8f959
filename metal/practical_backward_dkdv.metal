// Practical flash-attention backward, dK and dV (FlashAttention-2): a
// threadgroup owns a tile of keys of one KV head and walks every query tile
// of every query head that shares that KV head, accumulating in registers
//   P  = exp(scale * Q K^T + mask - lse)       (recomputed, never stored)
//   dV += P^T dO
//   dS = P * (dO V^T - delta)
//   dK += scale * dS^T Q
// so dK and dV are written once, with no atomics and in a fixed order.
//
// Inputs:  q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, DV),
//          dout (B, Hq, Lq, DV), any strides; lse, delta (B, Hq, Lq) float32
//          contiguous; mask_array, params, fparams as in practical_forward.metal.
// Outputs: dk (B, Hkv, Lk, D), dv (B, Hkv, Lk, DV) in T.
// Grid:    threadgroup (NSG * 32, 1, 1) per (key tile, KV head, batch).
//
// Template constants: T, D, DV, NSG, KPS (keys per simdgroup), BQ (query
// rows per staged tile).
//
// Layout: a simdgroup owns KPS keys, their K and V rows and their dK and dV
// accumulators in registers, split over the lanes like the forward's query
// rows. The Q and dO tiles are staged in threadgroup memory, shared by all
// simdgroups; each (query, key) pair costs two simd_sums (S and dP).

constexpr int DPT = (D + 31) / 32;
constexpr int DVPT = (DV + 31) / 32;
constexpr int DP = DPT * 32;
constexpr int DVP = DVPT * 32;
constexpr int BKV = NSG * KPS; // keys per threadgroup
constexpr int NT = NSG * 32;

threadgroup float q_tile[BQ * DP];
threadgroup float do_tile[BQ * DVP];

const int q_len = params[0];
const int k_len = params[1];
const int n_q_heads = params[2];
const int n_kv_heads = params[3];
const int mask_kind = params[4];
const float scale = fparams[0];
const float lowest = fparams[1];

const int tile = threadgroup_position_in_grid.x;
const int kv_head = threadgroup_position_in_grid.y;
const int batch = threadgroup_position_in_grid.z;
const int group = n_q_heads / n_kv_heads;
const int tid = thread_index_in_threadgroup;
const int lane = thread_index_in_simdgroup;
const int first_key = tile * BKV + simdgroup_index_in_threadgroup * KPS;

const int64_t k_base = batch * k_strides[0] + kv_head * k_strides[1];
const int64_t v_base = batch * v_strides[0] + kv_head * v_strides[1];
const int64_t mask_row_stride = flash_axis_stride(mask_array_shape[2], mask_array_strides[2]);
const int64_t mask_key_stride = flash_axis_stride(mask_array_shape[3], mask_array_strides[3]);

// K is kept pre-scaled, so q . k_reg is already the score.
float k_reg[KPS][DPT];
float v_reg[KPS][DVPT];
float dk_acc[KPS][DPT];
float dv_acc[KPS][DVPT];
for (int c = 0; c < KPS; ++c) {
  const int key = first_key + c;
  for (int t = 0; t < DPT; ++t) {
    const int d = t * 32 + lane;
    k_reg[c][t] = (key < k_len && d < D)
        ? scale * float(k[k_base + key * k_strides[2] + d * k_strides[3]])
        : 0.0f;
    dk_acc[c][t] = 0.0f;
  }
  for (int t = 0; t < DVPT; ++t) {
    const int d = t * 32 + lane;
    v_reg[c][t] = (key < k_len && d < DV)
        ? float(v[v_base + key * v_strides[2] + d * v_strides[3]])
        : 0.0f;
    dv_acc[c][t] = 0.0f;
  }
}

// Causal: query rows before the first one that sees this tile's first key
// contribute nothing; start at the query tile that holds it.
const int row_begin = (mask_kind == FLASH_MASK_CAUSAL)
    ? (flash_causal_row_begin(tile * BKV, q_len, k_len) / BQ) * BQ
    : 0;

for (int g = 0; g < group; ++g) {
  const int head = kv_head * group + g;
  const int64_t q_base = batch * q_strides[0] + head * q_strides[1];
  const int64_t do_base = batch * dout_strides[0] + head * dout_strides[1];
  const int64_t mask_base =
      batch * flash_axis_stride(mask_array_shape[0], mask_array_strides[0]) +
      head * flash_axis_stride(mask_array_shape[1], mask_array_strides[1]);
  const int64_t stat_base = (int64_t(batch) * n_q_heads + head) * q_len;

  for (int q0 = row_begin; q0 < q_len; q0 += BQ) {
    // Every simdgroup is done with the previous tile before it is overwritten.
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (int i = tid; i < BQ * DP; i += NT) {
      const int row = q0 + i / DP;
      const int d = i % DP;
      q_tile[i] = (row < q_len && d < D)
          ? float(q[q_base + row * q_strides[2] + d * q_strides[3]])
          : 0.0f;
    }
    for (int i = tid; i < BQ * DVP; i += NT) {
      const int row = q0 + i / DVP;
      const int d = i % DVP;
      do_tile[i] = (row < q_len && d < DV)
          ? float(dout[do_base + row * dout_strides[2] + d * dout_strides[3]])
          : 0.0f;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);

    const int rows = min(BQ, q_len - q0);
    for (int i = 0; i < rows; ++i) {
      const int row = q0 + i;
      float q_row[DPT];
      float do_row[DVPT];
      for (int t = 0; t < DPT; ++t) {
        q_row[t] = q_tile[i * DP + t * 32 + lane];
      }
      for (int t = 0; t < DVPT; ++t) {
        do_row[t] = do_tile[i * DVP + t * 32 + lane];
      }
      const float row_lse = lse[stat_base + row];
      const float row_delta = delta[stat_base + row];

      for (int c = 0; c < KPS; ++c) {
        const int key = first_key + c;
        // Uniform over the simdgroup, so the simd_sums below stay convergent.
        if (key >= k_len) {
          continue;
        }
        float s_part = 0.0f;
        for (int t = 0; t < DPT; ++t) {
          s_part += q_row[t] * k_reg[c][t];
        }
        float dp_part = 0.0f;
        for (int t = 0; t < DVPT; ++t) {
          dp_part += do_row[t] * v_reg[c][t];
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
        // A dropped score is a constant: it carries weight (in a row that
        // keeps nothing) but no gradient.
        const float p = keep ? flash_exp(s - row_lse)
                             : flash_dropped_weight(row_lse, lowest, k_len);
        const float ds = keep ? p * (dp - row_delta) : 0.0f;

        for (int t = 0; t < DVPT; ++t) {
          dv_acc[c][t] += p * do_row[t];
        }
        for (int t = 0; t < DPT; ++t) {
          dk_acc[c][t] += ds * q_row[t];
        }
      }
    }
  }
}

for (int c = 0; c < KPS; ++c) {
  const int key = first_key + c;
  if (key < k_len) {
    const int64_t out_row = (int64_t(batch) * n_kv_heads + kv_head) * k_len + key;
    for (int t = 0; t < DPT; ++t) {
      const int d = t * 32 + lane;
      if (d < D) {
        dk[out_row * D + d] = static_cast<T>(scale * dk_acc[c][t]);
      }
    }
    for (int t = 0; t < DVPT; ++t) {
      const int d = t * 32 + lane;
      if (d < DV) {
        dv[out_row * DV + d] = static_cast<T>(dv_acc[c][t]);
      }
    }
  }
}
