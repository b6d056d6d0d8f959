// Demo backward, dK and dV: dv = P^T dout, dk = scale * dS^T q.
//
// Grid: one threadgroup per (key tile of BK keys, KV head, batch), with
// BK / 8 SIMD groups; SIMD group g owns keys [8g, 8g + 8) of the tile: their
// k and v fragments and the dk, dv accumulators stay in registers. The
// threadgroup walks every query head that shares this KV head (GQA) and,
// for each, the query tiles that can see the key tile (none below it under
// causal), staging each q and dout tile once in threadgroup memory for all
// SIMD groups. The products are taken transposed (keys as rows), so P^T and
// dS^T come straight out of the accumulators and every key row is written
// by exactly one lane: no atomics, deterministic.
//
// Template constants: T, D, BQ (queries per staged tile), BK (keys per
// threadgroup), MASK as in demo_forward.metal.
//
// Inputs:  q, k, v, mask_array, params, fparams as in demo_forward.metal;
//          dout (B, Hq, Lq, D) in T, any strides; lse and delta (B, Hq, Lq)
//          float32, row-contiguous (see demo_backward_dq.metal).
// Outputs: dk and dv (B, Hkv, Lk, D) in T.

constexpr int NSG = BK / 8;
constexpr int NT = NSG * 32;
constexpr int LD = D + DEMO_PAD;
constexpr int DF = D / 8;
constexpr int QF = BQ / 8;  // fragments across a query tile
constexpr int TILE_ROWS = (BQ > BK) ? 2 * BQ : 2 * BK;

// k and v are staged here once, then the space holds the q and dout tiles.
threadgroup T smem[TILE_ROWS * LD];
threadgroup T* q_tile = smem;
threadgroup T* do_tile = smem + BQ * LD;
threadgroup float lse_tile[BQ];
threadgroup float delta_tile[BQ];

const uint tid = thread_index_in_threadgroup;
const ushort sg = simdgroup_index_in_threadgroup;
const ushort lane = thread_index_in_simdgroup;

const int q_len = params[0];
const int k_len = params[1];
const int n_q_heads = params[2];
const int n_kv_heads = params[3];
const int batch = threadgroup_position_in_grid.z;
const int kv_head = threadgroup_position_in_grid.y;
const int k_start = threadgroup_position_in_grid.x * BK;
const int group = n_q_heads / n_kv_heads;
const int causal_offset = k_len - q_len;
const float scale2 = fparams[0] * DEMO_LOG2E;
const float inv_k_len = 1.0f / float(k_len);

const int64_t k_base = batch * k_strides[0] + kv_head * k_strides[1];
const int64_t v_base = batch * v_strides[0] + kv_head * v_strides[1];
const size_t key_offset = size_t(batch * n_kv_heads + kv_head) * k_len;

// This lane's key (fragment row) and the first of its two query columns.
const short2 coord = demo_frag_coord(lane);
const int key = k_start + sg * 8 + coord.y;
const int col = coord.x;
const int64_t msi = flash_axis_stride(mask_array_shape[2], mask_array_strides[2]);
const int64_t msj = flash_axis_stride(mask_array_shape[3], mask_array_strides[3]);

// k and v fragments (keys as rows), loaded once.
demo_stage<T, BK, D, LD, NT>(smem, k + k_base, k_strides[2], k_strides[3], k_start, k_len, tid);
demo_stage<T, BK, D, LD, NT>(
    smem + BK * LD, v + v_base, v_strides[2], v_strides[3], k_start, k_len, tid);
threadgroup_barrier(mem_flags::mem_threadgroup);
simdgroup_matrix<T, 8, 8> k_frag[DF];
simdgroup_matrix<T, 8, 8> v_frag[DF];
DEMO_UNROLL
for (int d = 0; d < DF; ++d) {
  simdgroup_load(k_frag[d], smem + (sg * 8) * LD + d * 8, LD);
  simdgroup_load(v_frag[d], smem + (BK + sg * 8) * LD + d * 8, LD);
}

simdgroup_matrix<float, 8, 8> dk_acc[DF];
simdgroup_matrix<float, 8, 8> dv_acc[DF];
DEMO_UNROLL
for (int d = 0; d < DF; ++d) {
  dk_acc[d] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
  dv_acc[d] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
}

// Causal: query i sees key j when i >= j - offset, so the first query that
// sees any key of this tile is k_start - offset.
int q_first = 0;
if (MASK == DEMO_MASK_CAUSAL) {
  q_first = (max(0, k_start - causal_offset) / BQ) * BQ;
}

for (int g = 0; g < group; ++g) {
  const int head = kv_head * group + g;
  const int64_t q_base = batch * q_strides[0] + head * q_strides[1];
  const int64_t do_base = batch * dout_strides[0] + head * dout_strides[1];
  const size_t row_offset = size_t(batch * n_q_heads + head) * q_len;
  const int64_t mask_head = batch * flash_axis_stride(mask_array_shape[0], mask_array_strides[0]) +
      head * flash_axis_stride(mask_array_shape[1], mask_array_strides[1]);

  for (int q_start = q_first; q_start < q_len; q_start += BQ) {
    // Everyone is done with k/v staging or the previous q/dout tile.
    threadgroup_barrier(mem_flags::mem_threadgroup);
    demo_stage<T, BQ, D, LD, NT>(q_tile, q + q_base, q_strides[2], q_strides[3], q_start, q_len, tid);
    demo_stage<T, BQ, D, LD, NT>(
        do_tile, dout + do_base, dout_strides[2], dout_strides[3], q_start, q_len, tid);
    for (int i = tid; i < BQ; i += NT) {
      const bool inside = q_start + i < q_len;
      lse_tile[i] = inside ? lse[row_offset + q_start + i] : 0.0f;
      delta_tile[i] = inside ? delta[row_offset + q_start + i] : 0.0f;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);

    // S^T = k q^T and dP^T = v dout^T: (8, D) x (D, BQ) each.
    simdgroup_matrix<float, 8, 8> s_t[QF];
    simdgroup_matrix<float, 8, 8> dp_t[QF];
    DEMO_UNROLL
    for (int i = 0; i < QF; ++i) {
      s_t[i] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
      dp_t[i] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
    }
    DEMO_UNROLL
    for (int d = 0; d < DF; ++d) {
      DEMO_UNROLL
      for (int i = 0; i < QF; ++i) {
        simdgroup_matrix<T, 8, 8> q_t;
        simdgroup_matrix<T, 8, 8> do_t;
        simdgroup_load(q_t, q_tile + (i * 8) * LD + d * 8, LD, ulong2(0, 0), true);
        simdgroup_load(do_t, do_tile + (i * 8) * LD + d * 8, LD, ulong2(0, 0), true);
        simdgroup_multiply_accumulate(s_t[i], k_frag[d], q_t, s_t[i]);
        simdgroup_multiply_accumulate(dp_t[i], v_frag[d], do_t, dp_t[i]);
      }
    }

    // P^T and dS^T = P^T * (dP^T - delta), zero for queries past the end
    // and where a boolean or causal mask drops.
    simdgroup_matrix<T, 8, 8> p_t[QF];
    simdgroup_matrix<T, 8, 8> ds_t[QF];
    DEMO_UNROLL
    for (int i = 0; i < QF; ++i) {
      DEMO_UNROLL
      for (int e = 0; e < 2; ++e) {
        const int qi = i * 8 + col + e;
        const int query = q_start + qi;
        const int64_t mrow = mask_head + min(query, q_len - 1) * msi;
        const float s2 = demo_mask_score<MASK>(
            s_t[i].thread_elements()[e] * scale2,
            query,
            key,
            k_len,
            causal_offset,
            mask_array,
            mrow,
            msj);
        float w = demo_weight(s2, lse_tile[qi], inv_k_len);
        float ds = w * (dp_t[i].thread_elements()[e] - delta_tile[qi]);
        if (query >= q_len) {
          w = 0.0f;
          ds = 0.0f;
        } else if (
            key >= k_len ||
            demo_mask_drops<MASK>(query, key, causal_offset, mask_array, mrow, msj)) {
          ds = 0.0f;
        }
        p_t[i].thread_elements()[e] = T(w);
        ds_t[i].thread_elements()[e] = T(ds);
      }
    }

    // dv += P^T dout and dk += dS^T q: (8, BQ) x (BQ, D) each.
    DEMO_UNROLL
    for (int d = 0; d < DF; ++d) {
      DEMO_UNROLL
      for (int i = 0; i < QF; ++i) {
        simdgroup_matrix<T, 8, 8> do_f;
        simdgroup_matrix<T, 8, 8> q_f;
        simdgroup_load(do_f, do_tile + (i * 8) * LD + d * 8, LD);
        simdgroup_load(q_f, q_tile + (i * 8) * LD + d * 8, LD);
        simdgroup_multiply_accumulate(dv_acc[d], p_t[i], do_f, dv_acc[d]);
        simdgroup_multiply_accumulate(dk_acc[d], ds_t[i], q_f, dk_acc[d]);
      }
    }
  }
}

if (key < k_len) {
  const float dk_scale = fparams[0];
  device T* dk_row = dk + (key_offset + key) * D;
  device T* dv_row = dv + (key_offset + key) * D;
  DEMO_UNROLL
  for (int d = 0; d < DF; ++d) {
    dk_row[d * 8 + col] = T(dk_acc[d].thread_elements()[0] * dk_scale);
    dk_row[d * 8 + col + 1] = T(dk_acc[d].thread_elements()[1] * dk_scale);
    dv_row[d * 8 + col] = T(dv_acc[d].thread_elements()[0]);
    dv_row[d * 8 + col + 1] = T(dv_acc[d].thread_elements()[1]);
  }
}
