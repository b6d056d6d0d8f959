// A CPU meaning for the Metal Shading Language subset that MLX kernels use.
//
// The MLX-generated kernel source is compiled by the system C++ compiler
// against this header. Each GPU thread runs as a fiber; barriers and SIMD
// collectives are rendezvous points where the scheduler switches threads, so a
// threadgroup runs deterministically in the order the schedule gives.
#pragma once

// The fault handler long-jumps from its own stack back to the scheduler's,
// which fortified longjmp would refuse.
#undef _FORTIFY_SOURCE

#include <csetjmp>
#include <csignal>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <sys/mman.h>
#include <ucontext.h>
#include <dlfcn.h>

// Instrumented builds (MTL_TRACE) are compiled with -fsanitize=thread for the
// race detector and the profiler; the runtime itself is left uninstrumented.
#ifdef MTL_TRACE
#define MTL_NOINSTR __attribute__((no_sanitize("thread")))
#else
#define MTL_NOINSTR
#endif

namespace mtl {
#ifdef MTL_TRACE
constexpr bool tracing = true;
#else
constexpr bool tracing = false;
#endif
} // namespace mtl

// ---------------------------------------------------------------- scalars --

typedef _Float16 half;
typedef unsigned int uint;
typedef unsigned short ushort;
typedef unsigned char uchar;
typedef unsigned long ulong;

namespace mtl {

inline float bits_to_float(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}

} // namespace mtl

// bfloat16: the top 16 bits of a float32, rounded to nearest even.
struct bfloat {
  uint16_t bits;

  bfloat() = default;
  bfloat(float f) {
    uint32_t b = mtl::float_to_bits(f);
    if ((b & 0x7fffffffu) > 0x7f800000u) {
      bits = uint16_t((b >> 16) | 0x40); // keep NaN a NaN
    } else {
      bits = uint16_t((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
    }
  }
  template <
      class U,
      std::enable_if_t<std::is_arithmetic<U>::value || std::is_same<U, half>::value, int> = 0>
  bfloat(U u) : bfloat(float(u)) {}
  operator float() const {
    return mtl::bits_to_float(uint32_t(bits) << 16);
  }

  template <class U>
  bfloat& operator+=(U u) { return *this = bfloat(float(*this) + float(u)); }
  template <class U>
  bfloat& operator-=(U u) { return *this = bfloat(float(*this) - float(u)); }
  template <class U>
  bfloat& operator*=(U u) { return *this = bfloat(float(*this) * float(u)); }
  template <class U>
  bfloat& operator/=(U u) { return *this = bfloat(float(*this) / float(u)); }
};

// Metal's half literal suffix: 0.5h.
constexpr half operator""h(long double x) {
  return half(float(x));
}
constexpr half operator""h(unsigned long long x) {
  return half(float(x));
}

typedef half float16_t;
typedef bfloat bfloat16_t;

namespace mtl {

template <class T>
struct is_float_scalar
    : std::integral_constant<
          bool,
          std::is_same<T, float>::value || std::is_same<T, half>::value ||
              std::is_same<T, bfloat>::value> {};

template <class T>
struct is_scalar
    : std::integral_constant<
          bool,
          std::is_integral<T>::value || is_float_scalar<T>::value> {};

// bfloat with bfloat (or an integer) stays bfloat; with float or half it is
// float, as in Metal.
template <class A, class B>
struct bf_result {
  using type = std::conditional_t<
      std::is_integral<A>::value || std::is_integral<B>::value ||
          (std::is_same<A, bfloat>::value && std::is_same<B, bfloat>::value),
      bfloat,
      float>;
};

} // namespace mtl

#define MTL_BF_BINOP(op)                                                      \
  template <                                                                  \
      class A,                                                                \
      class B,                                                                \
      std::enable_if_t<                                                       \
          (std::is_same<A, bfloat>::value || std::is_same<B, bfloat>::value) && \
              mtl::is_scalar<A>::value && mtl::is_scalar<B>::value,           \
          int> = 0>                                                           \
  inline typename mtl::bf_result<A, B>::type operator op(A a, B b) {          \
    return typename mtl::bf_result<A, B>::type(float(a) op float(b));         \
  }
MTL_BF_BINOP(+)
MTL_BF_BINOP(-)
MTL_BF_BINOP(*)
MTL_BF_BINOP(/)
#undef MTL_BF_BINOP

#define MTL_BF_CMP(op)                                                        \
  template <                                                                  \
      class A,                                                                \
      class B,                                                                \
      std::enable_if_t<                                                       \
          (std::is_same<A, bfloat>::value || std::is_same<B, bfloat>::value) && \
              mtl::is_scalar<A>::value && mtl::is_scalar<B>::value,           \
          int> = 0>                                                           \
  inline bool operator op(A a, B b) {                                         \
    return float(a) op float(b);                                              \
  }
MTL_BF_CMP(<)
MTL_BF_CMP(>)
MTL_BF_CMP(<=)
MTL_BF_CMP(>=)
MTL_BF_CMP(==)
MTL_BF_CMP(!=)
#undef MTL_BF_CMP

inline bfloat operator-(bfloat a) {
  bfloat r;
  r.bits = a.bits ^ 0x8000;
  return r;
}
inline bfloat operator+(bfloat a) {
  return a;
}

// ---------------------------------------------------------------- vectors --

template <class T, int N>
struct vec;

namespace mtl {
constexpr int storage(int n) {
  return n == 3 ? 4 : n; // a 3-vector is the size of a 4-vector, as in Metal
}
} // namespace mtl

template <class T, int N, int... I>
struct swz {
  T v[mtl::storage(N)];
  using vtype = vec<T, int(sizeof...(I))>;
  operator vtype() const {
    return vtype(v[I]...);
  }
  swz& operator=(const vtype& o) {
    int k = 0;
    int idx[] = {I...};
    for (int i : idx) {
      v[i] = o.v[k++];
    }
    return *this;
  }
  swz& operator=(const swz& o) {
    return *this = vtype(o);
  }
  template <class U>
  swz& operator+=(const U& u) { return *this = vtype(*this) + u; }
  template <class U>
  swz& operator-=(const U& u) { return *this = vtype(*this) - u; }
  template <class U>
  swz& operator*=(const U& u) { return *this = vtype(*this) * u; }
  template <class U>
  swz& operator/=(const U& u) { return *this = vtype(*this) / u; }
};

#define MTL_SWIZZLES_2 \
  swz<T, 2, 0, 0> xx; \
  swz<T, 2, 0, 1> xy; \
  swz<T, 2, 1, 0> yx; \
  swz<T, 2, 1, 1> yy; \
  swz<T, 2, 0, 0> rr; \
  swz<T, 2, 0, 1> rg; \
  swz<T, 2, 1, 0> gr; \
  swz<T, 2, 1, 1> gg;

#define MTL_SWIZZLES_3 \
  swz<T, 3, 0, 0> xx; \
  swz<T, 3, 0, 1> xy; \
  swz<T, 3, 0, 2> xz; \
  swz<T, 3, 1, 0> yx; \
  swz<T, 3, 1, 1> yy; \
  swz<T, 3, 1, 2> yz; \
  swz<T, 3, 2, 0> zx; \
  swz<T, 3, 2, 1> zy; \
  swz<T, 3, 2, 2> zz; \
  swz<T, 3, 0, 1, 2> xyz; \
  swz<T, 3, 0, 2, 1> xzy; \
  swz<T, 3, 1, 0, 2> yxz; \
  swz<T, 3, 1, 2, 0> yzx; \
  swz<T, 3, 2, 0, 1> zxy; \
  swz<T, 3, 2, 1, 0> zyx; \
  swz<T, 3, 0, 0> rr; \
  swz<T, 3, 0, 1> rg; \
  swz<T, 3, 0, 2> rb; \
  swz<T, 3, 1, 0> gr; \
  swz<T, 3, 1, 1> gg; \
  swz<T, 3, 1, 2> gb; \
  swz<T, 3, 2, 0> br; \
  swz<T, 3, 2, 1> bg; \
  swz<T, 3, 2, 2> bb; \
  swz<T, 3, 0, 1, 2> rgb; \
  swz<T, 3, 0, 2, 1> rbg; \
  swz<T, 3, 1, 0, 2> grb; \
  swz<T, 3, 1, 2, 0> gbr; \
  swz<T, 3, 2, 0, 1> brg; \
  swz<T, 3, 2, 1, 0> bgr;

#define MTL_SWIZZLES_4 \
  swz<T, 4, 0, 0> xx; \
  swz<T, 4, 0, 1> xy; \
  swz<T, 4, 0, 2> xz; \
  swz<T, 4, 0, 3> xw; \
  swz<T, 4, 1, 0> yx; \
  swz<T, 4, 1, 1> yy; \
  swz<T, 4, 1, 2> yz; \
  swz<T, 4, 1, 3> yw; \
  swz<T, 4, 2, 0> zx; \
  swz<T, 4, 2, 1> zy; \
  swz<T, 4, 2, 2> zz; \
  swz<T, 4, 2, 3> zw; \
  swz<T, 4, 3, 0> wx; \
  swz<T, 4, 3, 1> wy; \
  swz<T, 4, 3, 2> wz; \
  swz<T, 4, 3, 3> ww; \
  swz<T, 4, 0, 1, 2> xyz; \
  swz<T, 4, 0, 1, 3> xyw; \
  swz<T, 4, 0, 2, 1> xzy; \
  swz<T, 4, 0, 2, 3> xzw; \
  swz<T, 4, 0, 3, 1> xwy; \
  swz<T, 4, 0, 3, 2> xwz; \
  swz<T, 4, 1, 0, 2> yxz; \
  swz<T, 4, 1, 0, 3> yxw; \
  swz<T, 4, 1, 2, 0> yzx; \
  swz<T, 4, 1, 2, 3> yzw; \
  swz<T, 4, 1, 3, 0> ywx; \
  swz<T, 4, 1, 3, 2> ywz; \
  swz<T, 4, 2, 0, 1> zxy; \
  swz<T, 4, 2, 0, 3> zxw; \
  swz<T, 4, 2, 1, 0> zyx; \
  swz<T, 4, 2, 1, 3> zyw; \
  swz<T, 4, 2, 3, 0> zwx; \
  swz<T, 4, 2, 3, 1> zwy; \
  swz<T, 4, 3, 0, 1> wxy; \
  swz<T, 4, 3, 0, 2> wxz; \
  swz<T, 4, 3, 1, 0> wyx; \
  swz<T, 4, 3, 1, 2> wyz; \
  swz<T, 4, 3, 2, 0> wzx; \
  swz<T, 4, 3, 2, 1> wzy; \
  swz<T, 4, 0, 1, 2, 3> xyzw; \
  swz<T, 4, 0, 1, 3, 2> xywz; \
  swz<T, 4, 0, 2, 1, 3> xzyw; \
  swz<T, 4, 0, 2, 3, 1> xzwy; \
  swz<T, 4, 0, 3, 1, 2> xwyz; \
  swz<T, 4, 0, 3, 2, 1> xwzy; \
  swz<T, 4, 1, 0, 2, 3> yxzw; \
  swz<T, 4, 1, 0, 3, 2> yxwz; \
  swz<T, 4, 1, 2, 0, 3> yzxw; \
  swz<T, 4, 1, 2, 3, 0> yzwx; \
  swz<T, 4, 1, 3, 0, 2> ywxz; \
  swz<T, 4, 1, 3, 2, 0> ywzx; \
  swz<T, 4, 2, 0, 1, 3> zxyw; \
  swz<T, 4, 2, 0, 3, 1> zxwy; \
  swz<T, 4, 2, 1, 0, 3> zyxw; \
  swz<T, 4, 2, 1, 3, 0> zywx; \
  swz<T, 4, 2, 3, 0, 1> zwxy; \
  swz<T, 4, 2, 3, 1, 0> zwyx; \
  swz<T, 4, 3, 0, 1, 2> wxyz; \
  swz<T, 4, 3, 0, 2, 1> wxzy; \
  swz<T, 4, 3, 1, 0, 2> wyxz; \
  swz<T, 4, 3, 1, 2, 0> wyzx; \
  swz<T, 4, 3, 2, 0, 1> wzxy; \
  swz<T, 4, 3, 2, 1, 0> wzyx; \
  swz<T, 4, 0, 0> rr; \
  swz<T, 4, 0, 1> rg; \
  swz<T, 4, 0, 2> rb; \
  swz<T, 4, 0, 3> ra; \
  swz<T, 4, 1, 0> gr; \
  swz<T, 4, 1, 1> gg; \
  swz<T, 4, 1, 2> gb; \
  swz<T, 4, 1, 3> ga; \
  swz<T, 4, 2, 0> br; \
  swz<T, 4, 2, 1> bg; \
  swz<T, 4, 2, 2> bb; \
  swz<T, 4, 2, 3> ba; \
  swz<T, 4, 3, 0> ar; \
  swz<T, 4, 3, 1> ag; \
  swz<T, 4, 3, 2> ab; \
  swz<T, 4, 3, 3> aa; \
  swz<T, 4, 0, 1, 2> rgb; \
  swz<T, 4, 0, 1, 3> rga; \
  swz<T, 4, 0, 2, 1> rbg; \
  swz<T, 4, 0, 2, 3> rba; \
  swz<T, 4, 0, 3, 1> rag; \
  swz<T, 4, 0, 3, 2> rab; \
  swz<T, 4, 1, 0, 2> grb; \
  swz<T, 4, 1, 0, 3> gra; \
  swz<T, 4, 1, 2, 0> gbr; \
  swz<T, 4, 1, 2, 3> gba; \
  swz<T, 4, 1, 3, 0> gar; \
  swz<T, 4, 1, 3, 2> gab; \
  swz<T, 4, 2, 0, 1> brg; \
  swz<T, 4, 2, 0, 3> bra; \
  swz<T, 4, 2, 1, 0> bgr; \
  swz<T, 4, 2, 1, 3> bga; \
  swz<T, 4, 2, 3, 0> bar; \
  swz<T, 4, 2, 3, 1> bag; \
  swz<T, 4, 3, 0, 1> arg; \
  swz<T, 4, 3, 0, 2> arb; \
  swz<T, 4, 3, 1, 0> agr; \
  swz<T, 4, 3, 1, 2> agb; \
  swz<T, 4, 3, 2, 0> abr; \
  swz<T, 4, 3, 2, 1> abg; \
  swz<T, 4, 0, 1, 2, 3> rgba; \
  swz<T, 4, 0, 1, 3, 2> rgab; \
  swz<T, 4, 0, 2, 1, 3> rbga; \
  swz<T, 4, 0, 2, 3, 1> rbag; \
  swz<T, 4, 0, 3, 1, 2> ragb; \
  swz<T, 4, 0, 3, 2, 1> rabg; \
  swz<T, 4, 1, 0, 2, 3> grba; \
  swz<T, 4, 1, 0, 3, 2> grab; \
  swz<T, 4, 1, 2, 0, 3> gbra; \
  swz<T, 4, 1, 2, 3, 0> gbar; \
  swz<T, 4, 1, 3, 0, 2> garb; \
  swz<T, 4, 1, 3, 2, 0> gabr; \
  swz<T, 4, 2, 0, 1, 3> brga; \
  swz<T, 4, 2, 0, 3, 1> brag; \
  swz<T, 4, 2, 1, 0, 3> bgra; \
  swz<T, 4, 2, 1, 3, 0> bgar; \
  swz<T, 4, 2, 3, 0, 1> barg; \
  swz<T, 4, 2, 3, 1, 0> bagr; \
  swz<T, 4, 3, 0, 1, 2> argb; \
  swz<T, 4, 3, 0, 2, 1> arbg; \
  swz<T, 4, 3, 1, 0, 2> agrb; \
  swz<T, 4, 3, 1, 2, 0> agbr; \
  swz<T, 4, 3, 2, 0, 1> abrg; \
  swz<T, 4, 3, 2, 1, 0> abgr;

// Swizzles assign component-wise, so the union needs explicit copies.
#define MTL_VEC_DATA_COPY(N)                         \
  vec_data() {}                                      \
  vec_data(const vec_data& o) {                      \
    std::memcpy(v, o.v, sizeof(v));                  \
  }                                                  \
  vec_data& operator=(const vec_data& o) {           \
    std::memcpy(v, o.v, sizeof(v));                  \
    return *this;                                    \
  }

template <class T, int N>
struct vec_data;
template <class T>
struct vec_data<T, 2> {
  MTL_VEC_DATA_COPY(2)
  union {
    T v[2];
    struct { T x, y; };
    struct { T r, g; };
    MTL_SWIZZLES_2
  };
};
template <class T>
struct vec_data<T, 3> {
  MTL_VEC_DATA_COPY(3)
  union {
    T v[4];
    struct { T x, y, z; };
    struct { T r, g, b; };
    MTL_SWIZZLES_3
  };
};
template <class T>
struct vec_data<T, 4> {
  MTL_VEC_DATA_COPY(4)
  union {
    T v[4];
    struct { T x, y, z, w; };
    struct { T r, g, b, a; };
    MTL_SWIZZLES_4
  };
};

namespace mtl {

template <class X>
struct vtraits {
  static constexpr int n = 0;
  using elem = X;
};
template <class T, int N>
struct vtraits<vec<T, N>> {
  static constexpr int n = N;
  using elem = T;
};
template <class T, int N, int... I>
struct vtraits<swz<T, N, I...>> {
  static constexpr int n = int(sizeof...(I));
  using elem = T;
};

template <class X>
constexpr int ncomp() {
  return vtraits<X>::n == 0 ? 1 : vtraits<X>::n;
}

} // namespace mtl

template <class T, int N>
struct vec : vec_data<T, N> {
  vec() = default;
  vec(const vec&) = default;
  vec& operator=(const vec&) = default;

  // A scalar broadcasts to every component.
  template <class U, std::enable_if_t<mtl::is_scalar<U>::value, int> = 0>
  vec(U s) {
    for (int i = 0; i < N; i++) {
      this->v[i] = T(s);
    }
  }
  // Components (scalars and vectors) concatenated: float4(a.xy, 0, 1).
  template <
      class A0,
      class A1,
      class... A,
      std::enable_if_t<
          mtl::ncomp<A0>() + mtl::ncomp<A1>() + (0 + ... + mtl::ncomp<A>()) == N,
          int> = 0>
  vec(const A0& a0, const A1& a1, const A&... a) {
    int k = 0;
    fill(k, a0);
    fill(k, a1);
    (fill(k, a), ...);
  }
  // Between element types conversions are explicit, as in Metal.
  template <class U, std::enable_if_t<!std::is_same<U, T>::value, int> = 0>
  explicit vec(const vec<U, N>& o) {
    for (int i = 0; i < N; i++) {
      this->v[i] = T(o.v[i]);
    }
  }
  template <int M, int... I, std::enable_if_t<sizeof...(I) == N, int> = 0>
  vec(const swz<T, M, I...>& s) : vec(vec<T, N>(s.v[I]...)) {}

  T& operator[](int i) {
    return this->v[i];
  }
  const T& operator[](int i) const {
    return this->v[i];
  }

  template <class U>
  vec& operator+=(const U& u) { return *this = vec(*this + u); }
  template <class U>
  vec& operator-=(const U& u) { return *this = vec(*this - u); }
  template <class U>
  vec& operator*=(const U& u) { return *this = vec(*this * u); }
  template <class U>
  vec& operator/=(const U& u) { return *this = vec(*this / u); }

 private:
  template <class X>
  void fill(int& k, const X& x) {
    if constexpr (mtl::vtraits<X>::n == 0) {
      this->v[k++] = T(x);
    } else {
      constexpr int M = mtl::vtraits<X>::n;
      vec<typename mtl::vtraits<X>::elem, M> t = x;
      for (int i = 0; i < M; i++) {
        this->v[k++] = T(t.v[i]);
      }
    }
  }
};

namespace mtl {

template <class X>
inline auto as_vec(const X& x) {
  if constexpr (vtraits<X>::n == 0) {
    return x;
  } else {
    return vec<typename vtraits<X>::elem, vtraits<X>::n>(x);
  }
}

// A swizzle (v.xy) passed to a function template that takes vectors: its
// type is not a vector, so such templates have an overload that converts it.
template <class X>
struct is_swizzle : std::false_type {};
template <class T, int N, int... I>
struct is_swizzle<swz<T, N, I...>> : std::true_type {};
template <class... X>
constexpr bool any_swizzle = (is_swizzle<X>::value || ...);

template <class X>
inline auto at(const X& x, int i) {
  if constexpr (vtraits<X>::n == 0) {
    return x;
  } else {
    return x.v[i];
  }
}

template <class A, class B>
struct vec_op {
  static constexpr bool ok =
      (vtraits<A>::n > 0 || vtraits<B>::n > 0) &&
      (vtraits<A>::n > 0 || is_scalar<A>::value) &&
      (vtraits<B>::n > 0 || is_scalar<B>::value);
  static constexpr int n = vtraits<A>::n > 0 ? vtraits<A>::n : vtraits<B>::n;
  // The vector's element type wins over a scalar, as in Metal.
  using elem = std::conditional_t<
      (vtraits<A>::n > 0),
      typename vtraits<A>::elem,
      typename vtraits<B>::elem>;
};

} // namespace mtl

#define MTL_VEC_BINOP(op)                                                     \
  template <class A, class B, std::enable_if_t<mtl::vec_op<A, B>::ok, int> = 0> \
  inline auto operator op(const A& a, const B& b) {                           \
    using E = typename mtl::vec_op<A, B>::elem;                               \
    constexpr int N = mtl::vec_op<A, B>::n;                                   \
    auto va = mtl::as_vec(a);                                                 \
    auto vb = mtl::as_vec(b);                                                 \
    vec<E, N> r;                                                              \
    for (int i = 0; i < N; i++) {                                             \
      r.v[i] = E(mtl::at(va, i) op mtl::at(vb, i));                           \
    }                                                                         \
    return r;                                                                 \
  }
MTL_VEC_BINOP(+)
MTL_VEC_BINOP(-)
MTL_VEC_BINOP(*)
MTL_VEC_BINOP(/)
MTL_VEC_BINOP(%)
MTL_VEC_BINOP(&)
MTL_VEC_BINOP(|)
MTL_VEC_BINOP(^)
MTL_VEC_BINOP(<<)
MTL_VEC_BINOP(>>)
#undef MTL_VEC_BINOP

#define MTL_VEC_CMP(op)                                                       \
  template <class A, class B, std::enable_if_t<mtl::vec_op<A, B>::ok, int> = 0> \
  inline auto operator op(const A& a, const B& b) {                           \
    constexpr int N = mtl::vec_op<A, B>::n;                                   \
    auto va = mtl::as_vec(a);                                                 \
    auto vb = mtl::as_vec(b);                                                 \
    vec<bool, N> r;                                                           \
    for (int i = 0; i < N; i++) {                                             \
      r.v[i] = mtl::at(va, i) op mtl::at(vb, i);                              \
    }                                                                         \
    return r;                                                                 \
  }
MTL_VEC_CMP(<)
MTL_VEC_CMP(>)
MTL_VEC_CMP(<=)
MTL_VEC_CMP(>=)
MTL_VEC_CMP(==)
MTL_VEC_CMP(!=)
MTL_VEC_CMP(&&)
MTL_VEC_CMP(||)
#undef MTL_VEC_CMP

template <class T, int N>
inline vec<T, N> operator-(const vec<T, N>& a) {
  vec<T, N> r;
  for (int i = 0; i < N; i++) {
    r.v[i] = T(-a.v[i]);
  }
  return r;
}
template <class T, int N>
inline vec<bool, N> operator!(const vec<T, N>& a) {
  vec<bool, N> r;
  for (int i = 0; i < N; i++) {
    r.v[i] = !a.v[i];
  }
  return r;
}

#define MTL_VEC_TYPES(T, name) \
  typedef vec<T, 2> name##2;   \
  typedef vec<T, 3> name##3;   \
  typedef vec<T, 4> name##4;
MTL_VEC_TYPES(float, float)
MTL_VEC_TYPES(half, half)
MTL_VEC_TYPES(bfloat, bfloat)
MTL_VEC_TYPES(int, int)
MTL_VEC_TYPES(uint, uint)
MTL_VEC_TYPES(short, short)
MTL_VEC_TYPES(ushort, ushort)
MTL_VEC_TYPES(char, char)
MTL_VEC_TYPES(uchar, uchar)
MTL_VEC_TYPES(bool, bool)
MTL_VEC_TYPES(long, long)
MTL_VEC_TYPES(ulong, ulong)
#undef MTL_VEC_TYPES

namespace metal {
using ::vec;
using ::half;
using ::bfloat;
typedef ::float2 float2;
typedef ::float3 float3;
typedef ::float4 float4;
typedef ::half2 half2;
typedef ::half3 half3;
typedef ::half4 half4;
typedef ::uint2 uint2;
typedef ::uint3 uint3;
typedef ::int2 int2;
typedef ::int3 int3;
typedef ::int4 int4;
} // namespace metal

// MLX's utils.h spelling of an inlined helper.
#define METAL_FUNC inline __attribute__((always_inline))

#include "metal_shared.h"


// ---------------------------------------------------------------- runtime --

// Switching between fibers. On x86-64 a hand-written switch saves only the
// callee-saved registers (tens of nanoseconds); elsewhere ucontext does it
// (a system call per switch, for the signal mask).
namespace mtl {

#if defined(__x86_64__) && !defined(MTL_USE_UCONTEXT)

extern "C" void mtl_switch_stack(void** save_sp, void* load_sp);
asm(R"(
  .text
  .p2align 4
  .hidden mtl_switch_stack
  .globl mtl_switch_stack
  .type mtl_switch_stack, @function
mtl_switch_stack:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size mtl_switch_stack, .-mtl_switch_stack
)");

struct Context {
  void* sp;
};

// A fresh context that starts in `entry` on the given stack.
MTL_NOINSTR inline void make_context(Context& c, char* stack, size_t size, void (*entry)(), Context*) {
  uintptr_t top = (uintptr_t(stack) + size) & ~uintptr_t(15);
  void** sp = reinterpret_cast<void**>(top);
  *--sp = nullptr; // entry never returns: a null return address
  *--sp = reinterpret_cast<void*>(entry);
  for (int i = 0; i < 6; i++) {
    *--sp = nullptr; // rbp rbx r12 r13 r14 r15
  }
  c.sp = sp;
}

MTL_NOINSTR inline void switch_context(Context& from, Context& to) {
  mtl_switch_stack(&from.sp, to.sp);
}

#else

struct Context {
  ucontext_t uc;
};

MTL_NOINSTR inline void make_context(Context& c, char* stack, size_t size, void (*entry)(), Context* link) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = size;
  c.uc.uc_link = &link->uc;
  makecontext(&c.uc, entry, 0);
}

MTL_NOINSTR inline void switch_context(Context& from, Context& to) {
  swapcontext(&from.uc, &to.uc);
}

#endif

} // namespace mtl

namespace mtl {

struct Attrs {
  uint3 thread_position_in_grid;
  uint3 threadgroup_position_in_grid;
  uint3 thread_position_in_threadgroup;
  uint3 threads_per_threadgroup;
  uint3 threadgroups_per_grid;
  uint3 threads_per_grid;
  uint3 dispatch_threads_per_threadgroup;
  uint3 grid_origin;
  uint3 grid_size;
  uint thread_index_in_threadgroup;
  uint simdgroup_index_in_threadgroup;
  uint thread_index_in_simdgroup;
  uint threads_per_simdgroup;
  uint simdgroups_per_threadgroup;
  uint thread_execution_width;
  uint quadgroup_index_in_threadgroup;
  uint thread_index_in_quadgroup;
};

enum Status { READY, WAITING, DONE };
enum Wait { W_NONE, W_BARRIER, W_SIMD };

struct Fiber {
  Context ctx;
  Attrs a;
  int status;
  int wait;
  int line;       // source line of the barrier or collective it waits at
  const char* op; // name of that barrier or collective
  int kind;       // its counter (profiling builds)
  int flags;      // mem_flags of the barrier it waits at
};

struct Slot {
  alignas(16) unsigned char b[64];
};

struct Simd {
  Slot slots[2][32];
  uint32_t lane_mask[2][32]; // lanes that took part, as each lane saw it
  unsigned gen;
  uint32_t epoch; // simdgroup or threadgroup memory barriers passed
};

struct TgVar {
  const void* key;
  void* ptr;
  size_t size;
  size_t scalar; // size of the array's element type
  const char* name;
};

// What the race detector knows of one byte of threadgroup memory: its last
// writer and the last two threads that read it, each with the memory-barrier
// epochs it was at and where in the library the access was made.
struct Access {
  int thread;
  uint32_t tg_epoch;
  uint32_t sg_epoch;
  uint32_t pc;
};
struct Shadow {
  Access writer;
  Access reader[2];
};

// ---------------------------------------------------------------- counters --
// Per threadgroup, in instrumented builds with a profile requested. SIMD-group
// operations (collectives, simdgroup_matrix operations, simdgroup barriers)
// count once per execution by a SIMD group, threadgroup barriers once per
// threadgroup, math functions once per scalar evaluation by a thread. After
// these come two counters per buffer: bytes loaded, bytes stored.
#define MTL_COUNTERS(X)                                                   \
  X(C_TG_LOADED, "threadgroup.loaded_bytes")                              \
  X(C_TG_STORED, "threadgroup.stored_bytes")                              \
  X(C_TG_PEAK, "threadgroup.peak_bytes")                                  \
  X(C_BARRIER_TG, "barrier.threadgroup")                                  \
  X(C_BARRIER_SG, "barrier.simdgroup")                                    \
  X(C_MMA, "simdgroup_matrix.multiply_accumulate")                        \
  X(C_SG_LOAD, "simdgroup_matrix.load")                                   \
  X(C_SG_STORE, "simdgroup_matrix.store")                                 \
  X(C_SIMD_SUM, "simd.simd_sum")                                          \
  X(C_SIMD_PRODUCT, "simd.simd_product")                                  \
  X(C_SIMD_MAX, "simd.simd_max")                                          \
  X(C_SIMD_MIN, "simd.simd_min")                                          \
  X(C_SIMD_AND, "simd.simd_and")                                          \
  X(C_SIMD_OR, "simd.simd_or")                                            \
  X(C_SIMD_XOR, "simd.simd_xor")                                          \
  X(C_SIMD_PREFIX_INCLUSIVE_SUM, "simd.simd_prefix_inclusive_sum")        \
  X(C_SIMD_PREFIX_EXCLUSIVE_SUM, "simd.simd_prefix_exclusive_sum")        \
  X(C_SIMD_PREFIX_INCLUSIVE_PRODUCT, "simd.simd_prefix_inclusive_product") \
  X(C_SIMD_PREFIX_EXCLUSIVE_PRODUCT, "simd.simd_prefix_exclusive_product") \
  X(C_SIMD_SHUFFLE, "simd.simd_shuffle")                                  \
  X(C_SIMD_BROADCAST, "simd.simd_broadcast")                              \
  X(C_SIMD_BROADCAST_FIRST, "simd.simd_broadcast_first")                  \
  X(C_SIMD_SHUFFLE_XOR, "simd.simd_shuffle_xor")                          \
  X(C_SIMD_SHUFFLE_DOWN, "simd.simd_shuffle_down")                        \
  X(C_SIMD_SHUFFLE_UP, "simd.simd_shuffle_up")                            \
  X(C_SIMD_SHUFFLE_ROTATE_DOWN, "simd.simd_shuffle_rotate_down")          \
  X(C_SIMD_SHUFFLE_ROTATE_UP, "simd.simd_shuffle_rotate_up")              \
  X(C_SIMD_ALL, "simd.simd_all")                                          \
  X(C_SIMD_ANY, "simd.simd_any")                                          \
  X(C_EXP, "math.exp")                                                    \
  X(C_EXP2, "math.exp2")                                                  \
  X(C_EXP10, "math.exp10")                                                \
  X(C_EXPM1, "math.expm1")                                                \
  X(C_LOG, "math.log")                                                    \
  X(C_LOG2, "math.log2")                                                  \
  X(C_LOG10, "math.log10")                                                \
  X(C_LOG1P, "math.log1p")                                                \
  X(C_POW, "math.pow")                                                    \
  X(C_POWR, "math.powr")                                                  \
  X(C_SQRT, "math.sqrt")                                                  \
  X(C_RSQRT, "math.rsqrt")                                                \
  X(C_SIN, "math.sin")                                                    \
  X(C_COS, "math.cos")                                                    \
  X(C_TAN, "math.tan")                                                    \
  X(C_ASIN, "math.asin")                                                  \
  X(C_ACOS, "math.acos")                                                  \
  X(C_ATAN, "math.atan")                                                  \
  X(C_ATAN2, "math.atan2")                                                \
  X(C_SINH, "math.sinh")                                                  \
  X(C_COSH, "math.cosh")                                                  \
  X(C_TANH, "math.tanh")                                                  \
  X(C_ASINH, "math.asinh")                                                \
  X(C_ACOSH, "math.acosh")                                                \
  X(C_ATANH, "math.atanh")                                                \
  X(C_ERF, "math.erf")                                                    \
  X(C_ATOMIC_DEVICE, "atomic.device")                                     \
  X(C_ATOMIC_TG, "atomic.threadgroup")

#define MTL_COUNTER_ENUM(id, name) id,
enum Counter { MTL_COUNTERS(MTL_COUNTER_ENUM) C_FIXED };
#undef MTL_COUNTER_ENUM

// One launch, as execute.py passes it (a ctypes structure of the same layout).
struct Launch {
  void** bufs;
  const uint64_t* ranges; // per buffer: first byte, one past the last
  int n_bufs;
  uint32_t grid[3];
  uint32_t group[3];
  int schedule; // 0 forward, 1 reverse, 2 shuffled, 3 ahead, 4 ahead-reverse
  uint64_t seed;
  uint64_t stack_size;
  char* msg;
  int msg_len;
  int detect_races;     // instrumented builds
  int fast_math;        // fast:: accuracy for metal:: and fast:: functions
  uint64_t* counters;   // threadgroups x n_counters, or null
  int n_counters;
  uint32_t** atomic_n;  // per buffer: float atomic adds per element, or null
  float** atomic_abs;   // per buffer: sum of their |operands|, or null
  uint64_t tg_float_adds; // out: float atomic additions to threadgroup memory
  const uint64_t* only;   // linear indices of the threadgroups to run, or null: all
  uint64_t n_only;
};

struct Runtime {
  Launch* launch;
  void** bufs;
  int n;             // threads in the current threadgroup
  int cur;           // the running thread
  Fiber* fibers;
  int* order;
  Simd* simd;
  char* stacks;
  size_t stack_size;
  Context sched;
  TgVar tg_vars[64];
  int n_tg_vars;
  unsigned char* tg_mem;
  size_t tg_used;
  size_t tg_cap;
  int error;         // 0 ok, 1 divergence, 2 other, 3 race
  char* msg;
  int msg_len;
  bool detect;       // race detection on (instrumented builds)
  bool fast_math;
  uint32_t tg_epoch; // threadgroup memory barriers passed
  Shadow* shadow;
  uint64_t* counters; // this threadgroup's counters, or null
  uintptr_t lib_base; // load address of this library, for access sites
};

static Runtime* rt = nullptr;

MTL_NOINSTR inline Fiber& self() {
  return rt->fibers[rt->cur];
}

MTL_NOINSTR inline void fail(int code, const char* text) {
  if (rt->error == 0) {
    rt->error = code;
    std::strncpy(rt->msg, text, rt->msg_len - 1);
    rt->msg[rt->msg_len - 1] = 0;
  }
}

MTL_NOINSTR inline void count(int counter, uint64_t n = 1) {
  if (tracing && rt->counters) rt->counters[counter] += n;
}

MTL_NOINSTR inline bool fast_functions() {
  return rt->fast_math;
}

// ------------------------------------------------------------ race detector --
// Instrumented builds are compiled with -fsanitize=thread, which makes the
// compiler call __tsan_readN / __tsan_writeN before every load and store
// that may touch shared memory; this header defines those functions (no
// sanitizer runtime is linked). An access to threadgroup memory, through any
// pointer or reference, by the kernel or a helper, reaches tg_access with its
// address and size; one to a buffer reaches device_access. Two accesses of a
// byte by different threads race when one is a write and no barrier with
// mem_threadgroup orders them: a threadgroup_barrier, or a simdgroup_barrier
// between threads of one SIMD group.

MTL_NOINSTR inline Access access_now(uint32_t pc) {
  const Fiber& f = rt->fibers[rt->cur];
  return Access{rt->cur, rt->tg_epoch, rt->simd[f.a.simdgroup_index_in_threadgroup].epoch, pc};
}

MTL_NOINSTR inline bool unordered(const Access& a, int me) {
  if (a.thread < 0 || a.thread == me) return false;
  if (a.tg_epoch != rt->tg_epoch) return false;
  const Fiber& f = rt->fibers[me];
  unsigned sg = f.a.simdgroup_index_in_threadgroup;
  return !(rt->fibers[a.thread].a.simdgroup_index_in_threadgroup == sg &&
           a.sg_epoch != rt->simd[sg].epoch);
}

// Access sites appear in messages as {pc:HEX}; execute.py turns them into
// the kernel source lines they belong to.
MTL_NOINSTR inline void report_race(
    uint32_t offset, const Access& first, bool first_writes, const Access& second,
    bool second_writes) {
  const TgVar* var = nullptr;
  for (int i = 0; i < rt->n_tg_vars; i++) {
    size_t base = (unsigned char*)rt->tg_vars[i].ptr - rt->tg_mem;
    if (offset >= base && offset < base + rt->tg_vars[i].size) var = &rt->tg_vars[i];
  }
  size_t index = var ? (offset - ((unsigned char*)var->ptr - rt->tg_mem)) / var->scalar : offset;
  const Attrs& a = rt->fibers[first.thread].a;
  const Attrs& b = rt->fibers[second.thread].a;
  char buf[640];
  __builtin_snprintf(
      buf, sizeof(buf),
      "threadgroup memory race on %s[%zu] in threadgroup (%u,%u,%u): thread "
      "(%u,%u,%u) %s it at {pc:%x} and thread (%u,%u,%u) %s it at {pc:%x} "
      "with no barrier that orders threadgroup memory between them",
      var ? var->name : "threadgroup memory", index,
      a.threadgroup_position_in_grid.x, a.threadgroup_position_in_grid.y,
      a.threadgroup_position_in_grid.z, a.thread_position_in_threadgroup.x,
      a.thread_position_in_threadgroup.y, a.thread_position_in_threadgroup.z,
      first_writes ? "writes" : "reads", first.pc, b.thread_position_in_threadgroup.x,
      b.thread_position_in_threadgroup.y, b.thread_position_in_threadgroup.z,
      second_writes ? "writes" : "reads", second.pc);
  fail(3, buf);
}

MTL_NOINSTR inline void tg_access(size_t offset, size_t size, bool write, uint32_t pc) {
  Runtime& r = *rt;
  count(write ? C_TG_STORED : C_TG_LOADED, size);
  if (!r.detect || r.error) return;
  int me = r.cur;
  Access now = access_now(pc);
  for (size_t o = offset; o < offset + size && o < r.tg_cap; o++) {
    Shadow& sh = r.shadow[o];
    if (unordered(sh.writer, me)) {
      report_race(uint32_t(o), sh.writer, true, now, write);
      return;
    }
    if (write) {
      for (int k = 0; k < 2; k++) {
        if (unordered(sh.reader[k], me)) {
          report_race(uint32_t(o), sh.reader[k], false, now, true);
          return;
        }
      }
      sh.writer = now;
    } else {
      if (sh.reader[0].thread != me) sh.reader[1] = sh.reader[0];
      sh.reader[0] = now;
    }
  }
}

MTL_NOINSTR inline int buffer_of(uintptr_t address) {
  const Launch& l = *rt->launch;
  for (int b = 0; b < l.n_bufs; b++) {
    if (address - l.ranges[2 * b] < l.ranges[2 * b + 1] - l.ranges[2 * b]) return b;
  }
  return -1;
}

MTL_NOINSTR inline void device_access(uintptr_t address, size_t size, bool write) {
  int b = buffer_of(address);
  if (b >= 0) rt->counters[C_FIXED + 2 * b + (write ? 1 : 0)] += size;
}

// An atomic operation at p, counted by address space. Float additions to a
// buffer with statistics (atomic float outputs) record their count and the
// magnitude of their operands per element.
MTL_NOINSTR inline void atomic_op(const void* p, bool float_add, float operand) {
  if (!tracing) return;
  Runtime& r = *rt;
  if (uintptr_t(p) - uintptr_t(r.tg_mem) < r.tg_cap) {
    count(C_ATOMIC_TG);
    if (float_add) r.launch->tg_float_adds++;
    return;
  }
  count(C_ATOMIC_DEVICE);
  int b = float_add && r.launch->atomic_n ? buffer_of(uintptr_t(p)) : -1;
  if (b < 0 || r.launch->atomic_n[b] == nullptr) return;
  size_t e = (uintptr_t(p) - r.launch->ranges[2 * b]) / sizeof(float);
  r.launch->atomic_n[b][e] += 1;
  r.launch->atomic_abs[b][e] += __builtin_fabsf(operand);
}

// The hooks' common path: most accesses are neither to threadgroup memory
// nor counted, and return after two comparisons.
__attribute__((noinline)) MTL_NOINSTR inline void counted_access(
    const void* p, size_t size, bool write, void* pc) {
  Runtime* r = rt;
  uintptr_t offset = uintptr_t(p) - uintptr_t(r->tg_mem);
  if (offset < r->tg_cap) {
    tg_access(offset, size, write, uint32_t(uintptr_t(pc) - r->lib_base));
  } else {
    device_access(uintptr_t(p), size, write);
  }
}

MTL_NOINSTR inline __attribute__((always_inline)) void on_access(
    const void* p, size_t size, bool write, void* pc) {
  Runtime* r = rt;
  if (r == nullptr) return;
  if (uintptr_t(p) - uintptr_t(r->tg_mem) < r->tg_cap || r->counters) {
    counted_access(p, size, write, pc);
  }
}

// Park the running thread and return to the scheduler.
MTL_NOINSTR inline void park(int wait, const char* op, int line, int kind = -1, int flags = 0) {
  Fiber& f = self();
  f.status = WAITING;
  f.wait = wait;
  f.op = op;
  f.line = line;
  f.kind = kind;
  f.flags = flags;
  switch_context(f.ctx, rt->sched);
  if (rt->error) {
    // The scheduler never resumes a thread after an error; this is a guard.
    switch_context(f.ctx, rt->sched);
  }
}

// Contribute `size` bytes to a SIMD-group exchange; returns the 32 slots of
// that exchange once every live lane of the group has contributed, and the
// mask of lanes that took part.
MTL_NOINSTR inline const Slot* simd_exchange(
    const void* data, size_t size, const char* op, int kind, int line, uint32_t* active,
    int flags = 0) {
  Fiber& f = self();
  Simd& s = rt->simd[f.a.simdgroup_index_in_threadgroup];
  int parity = s.gen & 1;
  std::memcpy(s.slots[parity][f.a.thread_index_in_simdgroup].b, data, size);
  park(W_SIMD, op, line, kind, flags);
  *active = s.lane_mask[parity][f.a.thread_index_in_simdgroup];
  return s.slots[parity];
}

// Threadgroup memory: one block per declaration per threadgroup, filled with
// 0xff bytes (NaN in every float type, -1 in integers) so that a read before
// the first write shows in the results. Blocks start at 16-byte boundaries,
// the granularity Metal allocates threadgroup memory in, and together may not
// pass Metal's limit of 32 KB per threadgroup.
template <class T>
MTL_NOINSTR inline T& tg_var(const void* key, const char* name) {
  for (int i = 0; i < rt->n_tg_vars; i++) {
    if (rt->tg_vars[i].key == key) {
      return *reinterpret_cast<T*>(rt->tg_vars[i].ptr);
    }
  }
  size_t at = (rt->tg_used + 15) & ~size_t(15);
  if (at + sizeof(T) > rt->tg_cap) {
    char text[200];
    __builtin_snprintf(
        text, sizeof(text),
        "threadgroup memory of %zu bytes (with `%s`) exceeds %zu bytes (32 KB), "
        "the most Metal allows per threadgroup",
        at + sizeof(T), name, rt->tg_cap);
    fail(2, text);
    park(W_NONE, "error", 0);
  }
  if (rt->n_tg_vars == 64) {
    fail(2, "more than 64 threadgroup memory declarations");
    park(W_NONE, "error", 0);
  }
  void* p = rt->tg_mem + at;
  std::memset(p, 0xff, sizeof(T));
  rt->tg_used = at + sizeof(T);
  rt->tg_vars[rt->n_tg_vars++] =
      TgVar{key, p, sizeof(T), sizeof(std::remove_all_extents_t<T>), name};
  return *reinterpret_cast<T*>(p);
}

} // namespace mtl

#define MTL_TG_KEY ([] { static char key; return &key; }())

// The entry points -fsanitize=thread compiles calls to (GCC and Clang),
// hidden so that calls to them are direct rather than through the PLT.
#ifdef MTL_TRACE
#pragma GCC visibility push(hidden)
extern "C" {
#define MTL_TSAN_SIZE(n)                                                 \
  MTL_NOINSTR void __tsan_read##n(void* p) {                             \
    mtl::on_access(p, n, false, __builtin_return_address(0));            \
  }                                                                      \
  MTL_NOINSTR void __tsan_write##n(void* p) {                            \
    mtl::on_access(p, n, true, __builtin_return_address(0));             \
  }                                                                      \
  MTL_NOINSTR void __tsan_unaligned_read##n(void* p) {                   \
    mtl::on_access(p, n, false, __builtin_return_address(0));            \
  }                                                                      \
  MTL_NOINSTR void __tsan_unaligned_write##n(void* p) {                  \
    mtl::on_access(p, n, true, __builtin_return_address(0));             \
  }                                                                      \
  MTL_NOINSTR void __tsan_volatile_read##n(void* p) {                    \
    mtl::on_access(p, n, false, __builtin_return_address(0));            \
  }                                                                      \
  MTL_NOINSTR void __tsan_volatile_write##n(void* p) {                   \
    mtl::on_access(p, n, true, __builtin_return_address(0));             \
  }
MTL_TSAN_SIZE(1)
MTL_TSAN_SIZE(2)
MTL_TSAN_SIZE(4)
MTL_TSAN_SIZE(8)
MTL_TSAN_SIZE(16)
#undef MTL_TSAN_SIZE
MTL_NOINSTR void __tsan_init() {}
MTL_NOINSTR void __tsan_func_entry(void*) {}
MTL_NOINSTR void __tsan_vptr_update(void*, void*) {}
MTL_NOINSTR void __tsan_vptr_read(void*) {}
#ifdef __clang__
MTL_NOINSTR void __tsan_func_exit() {}
MTL_NOINSTR void __tsan_read_range(void* p, unsigned long size) {
  mtl::on_access(p, size, false, __builtin_return_address(0));
}
MTL_NOINSTR void __tsan_write_range(void* p, unsigned long size) {
  mtl::on_access(p, size, true, __builtin_return_address(0));
}
MTL_NOINSTR void* __tsan_memcpy(void* d, const void* s, unsigned long n) {
  mtl::on_access(s, n, false, __builtin_return_address(0));
  mtl::on_access(d, n, true, __builtin_return_address(0));
  return std::memcpy(d, s, n);
}
MTL_NOINSTR void* __tsan_memmove(void* d, const void* s, unsigned long n) {
  mtl::on_access(s, n, false, __builtin_return_address(0));
  mtl::on_access(d, n, true, __builtin_return_address(0));
  return std::memmove(d, s, n);
}
MTL_NOINSTR void* __tsan_memset(void* d, int c, unsigned long n) {
  mtl::on_access(d, n, true, __builtin_return_address(0));
  return std::memset(d, c, n);
}
#else
MTL_NOINSTR void __tsan_func_exit(void*) {}
MTL_NOINSTR void __tsan_read_range(void* p, long size) {
  mtl::on_access(p, size_t(size), false, __builtin_return_address(0));
}
MTL_NOINSTR void __tsan_write_range(void* p, long size) {
  mtl::on_access(p, size_t(size), true, __builtin_return_address(0));
}
#endif
}
#pragma GCC visibility pop
#endif

// ------------------------------------------------------------------- math --

namespace metal {

template <class T>
using if_float = std::enable_if_t<mtl::is_float_scalar<T>::value, int>;
template <class T>
using if_scalar = std::enable_if_t<mtl::is_scalar<T>::value, int>;

// The vector and swizzle forms of a one-argument function, component-wise.
#define MTL_ELEMENTWISE1(name)                                 \
  template <class T, int N>                                    \
  inline vec<T, N> name(const vec<T, N>& a) {                  \
    vec<T, N> r;                                               \
    for (int i = 0; i < N; i++) {                              \
      r.v[i] = name(a.v[i]);                                   \
    }                                                          \
    return r;                                                  \
  }                                                            \
  template <class T, int M, int... I>                          \
  inline auto name(const swz<T, M, I...>& a) {                 \
    return name(vec<T, int(sizeof...(I))>(a));                 \
  }

// The mixed-type, vector and vector-with-scalar forms of a two-argument
// function, component-wise.
#define MTL_ELEMENTWISE2(name)                                            \
  template <class T, class U, if_scalar<T> = 0, if_scalar<U> = 0>         \
  inline T name(T a, U b) {                                               \
    return name(a, T(b));                                                 \
  }                                                                       \
  template <class T, int N>                                               \
  inline vec<T, N> name(const vec<T, N>& a, const vec<T, N>& b) {         \
    vec<T, N> r;                                                          \
    for (int i = 0; i < N; i++) {                                         \
      r.v[i] = name(a.v[i], b.v[i]);                                      \
    }                                                                     \
    return r;                                                             \
  }                                                                       \
  template <class T, int N, class U, if_scalar<U> = 0>                    \
  inline vec<T, N> name(const vec<T, N>& a, U b) {                        \
    return name(a, vec<T, N>(T(b)));                                      \
  }

#define MTL_UNARY(name, expr)                                  \
  template <class T, if_float<T> = 0>                          \
  inline T name(T t) {                                         \
    float x = float(t);                                        \
    return T(expr);                                            \
  }                                                            \
  MTL_ELEMENTWISE1(name)

MTL_UNARY(floor, __builtin_floorf(x))
MTL_UNARY(ceil, __builtin_ceilf(x))
MTL_UNARY(round, __builtin_roundf(x))
MTL_UNARY(rint, __builtin_rintf(x))
MTL_UNARY(trunc, __builtin_truncf(x))
MTL_UNARY(fract, x - __builtin_floorf(x))
MTL_UNARY(fabs, __builtin_fabsf(x))
MTL_UNARY(saturate, x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x))
MTL_UNARY(sign, x > 0.0f ? 1.0f : (x < 0.0f ? -1.0f : (x == x ? x : 0.0f)))
#undef MTL_UNARY

} // namespace metal

// Metal's fast math functions (emulator.run(..., math="fast")). Section 8.4
// of the Metal Shading Language specification bounds each function with fast
// math enabled (table 8.2, single precision); on macOS 15 and later the
// unqualified metal:: functions are the fast ones too unless a library asks
// for precise fp32 functions, which MLX does not (it sets only the math
// mode). Under math="fast" every metal:: and fast:: call on float (and on
// bfloat, which MLX computes in float) returns the CPU result moved by the
// full bound the table allows, in a direction that depends on the input, so
// a kernel's tolerance meets the worst the table permits; entries the table
// gives as a composition ("implemented as") are computed that way, the odd
// ones on |x| with the sign restored. NaN, infinities and exact zeros stay
// exact, precise:: calls are never moved, and half math is computed in float
// and rounded (the half table is not modelled).
namespace mtl {
namespace fm {

inline uint32_t hash(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

// +1 or -1, fixed by the input and the function.
inline int direction(float x, float y, int salt) {
  uint32_t h = hash(float_to_bits(x) ^ hash(float_to_bits(y) + uint32_t(salt) * 0x9e3779b9u));
  return (h & 1u) ? 1 : -1;
}

// y moved by k units in the last place, away from zero for k > 0; it stays
// finite, nonzero and of y's sign.
inline float ulps(float y, int64_t k) {
  if (!__builtin_isfinite(y) || y == 0.0f || k == 0) return y;
  uint32_t b = float_to_bits(y);
  int64_t magnitude = int64_t(b & 0x7fffffffu) + k;
  if (magnitude < 1) magnitude = 1;
  if (magnitude > 0x7f7fffff) magnitude = 0x7f7fffff;
  return bits_to_float(uint32_t(magnitude) | (b & 0x80000000u));
}

inline float off_by_ulps(float y, float x, float x2, int salt, float bound) {
  return ulps(y, direction(x, x2, salt) * int64_t(bound < 1e6f ? bound : 1e6f));
}

inline float off_by(float y, float x, int salt, float error) {
  if (!__builtin_isfinite(y)) return y;
  return y + float(direction(x, 0.0f, salt)) * error;
}

enum Salt { S_RECIP = 1000, S_DIVIDE };

inline float exp(float x) {
  // <= 3 + floor(fabs(2 * x)) ulp
  return off_by_ulps(__builtin_expf(x), x, 0.0f, C_EXP, 3.0f + __builtin_floorf(__builtin_fabsf(2.0f * x)));
}
inline float exp2(float x) {
  return off_by_ulps(__builtin_exp2f(x), x, 0.0f, C_EXP2, 3.0f + __builtin_floorf(__builtin_fabsf(2.0f * x)));
}
inline float exp10(float x) {
  return exp2(x * 3.32192809488736234787f); // implemented as exp2(x * log2(10))
}
inline float log(float x) {
  // absolute error <= 2^-21 on [0.5, 2], else <= 3 ulp for x > 0
  float y = __builtin_logf(x);
  if (!(x > 0.0f) || !__builtin_isfinite(x)) return y;
  if (x >= 0.5f && x <= 2.0f) return off_by(y, x, C_LOG, 0x1p-21f);
  return off_by_ulps(y, x, 0.0f, C_LOG, 3.0f);
}
inline float log2(float x) {
  // absolute error <= 2^-22 on [0.5, 2], else <= 2 ulp for x > 0
  float y = __builtin_log2f(x);
  if (!(x > 0.0f) || !__builtin_isfinite(x)) return y;
  if (x >= 0.5f && x <= 2.0f) return off_by(y, x, C_LOG2, 0x1p-22f);
  return off_by_ulps(y, x, 0.0f, C_LOG2, 2.0f);
}
inline float log10(float x) {
  return log2(x) * 0.30102999566398119521f; // implemented as log2(x) * log10(2)
}
inline float rsqrt(float x) {
  float y = 1.0f / __builtin_sqrtf(x); // <= 2 ulp
  if (!(x > 0.0f) || !__builtin_isfinite(x)) return y;
  return off_by_ulps(y, x, 0.0f, C_RSQRT, 2.0f);
}
inline float sqrt(float x) {
  // implemented as x * rsqrt(x), special cases handled correctly
  if (!(x > 0.0f) || !__builtin_isfinite(x)) return __builtin_sqrtf(x);
  return x * rsqrt(x);
}
inline float unit_clamp(float y) {
  return y < -1.0f ? -1.0f : (y > 1.0f ? 1.0f : y);
}
inline float sin(float x) {
  // absolute error <= 2^-13 on [-pi, pi] ("larger otherwise": the same here)
  float y = __builtin_sinf(x);
  return __builtin_isfinite(y) ? unit_clamp(off_by(y, x, C_SIN, 0x1p-13f)) : y;
}
inline float cos(float x) {
  float y = __builtin_cosf(x);
  return __builtin_isfinite(y) ? unit_clamp(off_by(y, x, C_COS, 0x1p-13f)) : y;
}
inline float recip(float x) {
  float m = __builtin_fabsf(x); // 1.0 / x: <= 1 ulp for |x| in [2^-126, 2^126]
  float y = 1.0f / x;
  return (m >= 0x1p-126f && m <= 0x1p126f) ? off_by_ulps(y, x, 0.0f, S_RECIP, 1.0f) : y;
}
inline float divide(float x, float y) {
  float m = __builtin_fabsf(y); // x / y: <= 2.5 ulp for |y| in [2^-126, 2^126]
  float q = x / y;
  return (m >= 0x1p-126f && m <= 0x1p126f) ? off_by_ulps(q, x, y, S_DIVIDE, 2.0f) : q;
}
inline float tan(float x) {
  return sin(x) * recip(cos(x)); // implemented as sin(x) * (1.0 / cos(x))
}
inline float asin(float x) {
  float y = __builtin_asinf(x); // <= 5 ulp on [-1, 1] for |x| >= 2^-125
  float m = __builtin_fabsf(x);
  return (m <= 1.0f && m >= 0x1p-125f) ? off_by_ulps(y, x, 0.0f, C_ASIN, 5.0f) : y;
}
inline float acos(float x) {
  float y = __builtin_acosf(x); // <= 5 ulp on [-1, 1]
  return __builtin_fabsf(x) <= 1.0f ? off_by_ulps(y, x, 0.0f, C_ACOS, 5.0f) : y;
}
inline float atan(float x) {
  return off_by_ulps(__builtin_atanf(x), x, 0.0f, C_ATAN, 5.0f); // <= 5 ulp
}
inline float atan2(float y, float x) {
  // implemented as atan(y / x), +-pi for x < 0; undefined for x or y zero
  if (x > 0.0f && y != 0.0f) return atan(divide(y, x));
  if (x < 0.0f && y > 0.0f) return atan(divide(y, x)) + 3.14159265358979323846f;
  if (x < 0.0f && y < 0.0f) return atan(divide(y, x)) - 3.14159265358979323846f;
  return __builtin_atan2f(y, x);
}
inline float sinh(float x) {
  float m = __builtin_fabsf(x); // implemented as 0.5 * (exp(x) - exp(-x))
  return __builtin_copysignf(0.5f * (exp(m) - exp(-m)), x);
}
inline float cosh(float x) {
  return 0.5f * (exp(x) + exp(-x)); // implemented as 0.5 * (exp(x) + exp(-x))
}
inline float tanh(float x) {
  // implemented as (t - 1) / (t + 1) with t = exp(2 x); t overflowing gives 1
  float m = __builtin_fabsf(x);
  float t = exp(2.0f * m);
  float y = __builtin_isinf(t) ? 1.0f : divide(t - 1.0f, t + 1.0f);
  return __builtin_copysignf(y, x);
}
inline float asinh(float x) {
  float m = __builtin_fabsf(x); // implemented as log(x + sqrt(x * x + 1))
  return __builtin_copysignf(log(m + sqrt(m * m + 1.0f)), x);
}
inline float acosh(float x) {
  return log(x + sqrt(x * x - 1.0f)); // implemented as log(x + sqrt(x * x - 1))
}
inline float atanh(float x) {
  return 0.5f * log(divide(1.0f + x, 1.0f - x)); // 0.5 * log((1 + x) / (1 - x))
}
inline float pow(float x, float y) {
  // implemented as exp2(y * log2(x)); other bases keep the CPU result
  if (!(x > 0.0f) || !__builtin_isfinite(x) || !__builtin_isfinite(y)) return __builtin_powf(x, y);
  return exp2(y * log2(x));
}

} // namespace fm

// One math function: its CPU result and its fast variant.
template <int F>
struct math1;
template <int F>
struct math2;
#define MTL_MATH1(id, precise_expr, fast_expr)             \
  template <>                                              \
  struct math1<id> {                                       \
    static float precise(float x) { return precise_expr; } \
    static float fast(float x) { return fast_expr; }       \
  };
MTL_MATH1(C_EXP, __builtin_expf(x), fm::exp(x))
MTL_MATH1(C_EXP2, __builtin_exp2f(x), fm::exp2(x))
MTL_MATH1(C_EXP10, __builtin_exp10f(x), fm::exp10(x))
MTL_MATH1(C_EXPM1, __builtin_expm1f(x), __builtin_expm1f(x))
MTL_MATH1(C_LOG, __builtin_logf(x), fm::log(x))
MTL_MATH1(C_LOG2, __builtin_log2f(x), fm::log2(x))
MTL_MATH1(C_LOG10, __builtin_log10f(x), fm::log10(x))
MTL_MATH1(C_LOG1P, __builtin_log1pf(x), __builtin_log1pf(x))
MTL_MATH1(C_SQRT, __builtin_sqrtf(x), fm::sqrt(x))
MTL_MATH1(C_RSQRT, 1.0f / __builtin_sqrtf(x), fm::rsqrt(x))
MTL_MATH1(C_SIN, __builtin_sinf(x), fm::sin(x))
MTL_MATH1(C_COS, __builtin_cosf(x), fm::cos(x))
MTL_MATH1(C_TAN, __builtin_tanf(x), fm::tan(x))
MTL_MATH1(C_ASIN, __builtin_asinf(x), fm::asin(x))
MTL_MATH1(C_ACOS, __builtin_acosf(x), fm::acos(x))
MTL_MATH1(C_ATAN, __builtin_atanf(x), fm::atan(x))
MTL_MATH1(C_SINH, __builtin_sinhf(x), fm::sinh(x))
MTL_MATH1(C_COSH, __builtin_coshf(x), fm::cosh(x))
MTL_MATH1(C_TANH, __builtin_tanhf(x), fm::tanh(x))
MTL_MATH1(C_ASINH, __builtin_asinhf(x), fm::asinh(x))
MTL_MATH1(C_ACOSH, __builtin_acoshf(x), fm::acosh(x))
MTL_MATH1(C_ATANH, __builtin_atanhf(x), fm::atanh(x))
MTL_MATH1(C_ERF, __builtin_erff(x), __builtin_erff(x))
#undef MTL_MATH1
#define MTL_MATH2(id, precise_expr, fast_expr)                      \
  template <>                                                       \
  struct math2<id> {                                                \
    static float precise(float x, float y) { return precise_expr; } \
    static float fast(float x, float y) { return fast_expr; }       \
  };
MTL_MATH2(C_POW, __builtin_powf(x, y), fm::pow(x, y))
MTL_MATH2(C_POWR, __builtin_powf(x, y), fm::pow(x, y))
MTL_MATH2(C_ATAN2, __builtin_atan2f(x, y), fm::atan2(x, y))
MTL_MATH2(C_FIXED, x / y, fm::divide(x, y)) // divide: not counted
#undef MTL_MATH2

// Metal's fast and precise variants exist for single precision only; MLX's
// bfloat overloads compute in float with the variant of their namespace.
template <class T>
constexpr bool has_fast_variant = !std::is_same<T, half>::value;

template <int F, bool MayBeFast, class T>
inline T eval1(T t) {
  count(F);
  float x = float(t);
  if (MayBeFast && has_fast_variant<T> && fast_functions()) return T(math1<F>::fast(x));
  return T(math1<F>::precise(x));
}
template <int F, bool MayBeFast, class T>
inline T eval2(T a, T b) {
  if (F != C_FIXED) count(F);
  float x = float(a), y = float(b);
  if (MayBeFast && has_fast_variant<T> && fast_functions()) return T(math2<F>::fast(x, y));
  return T(math2<F>::precise(x, y));
}

} // namespace mtl

namespace metal {

// Functions the variants differ in. MayBeFast: metal:: and fast:: calls.
#define MTL_APPROX_UNARY(name, id, may_be_fast)                \
  template <class T, if_float<T> = 0>                          \
  inline T name(T t) {                                         \
    return mtl::eval1<mtl::id, may_be_fast>(t);                \
  }                                                            \
  MTL_ELEMENTWISE1(name)
#define MTL_APPROX_BINARY(name, id, may_be_fast)                          \
  template <class T, if_float<T> = 0>                                     \
  inline T name(T a, T b) {                                               \
    return mtl::eval2<mtl::id, may_be_fast>(a, b);                        \
  }                                                                       \
  MTL_ELEMENTWISE2(name)                                                  \
  template <class A, class B, std::enable_if_t<mtl::any_swizzle<A, B>, int> = 0> \
  inline auto name(const A& a, const B& b) {                              \
    return name(mtl::as_vec(a), mtl::as_vec(b));                          \
  }
#define MTL_APPROX_FUNCTIONS(may_be_fast)            \
  MTL_APPROX_UNARY(exp, C_EXP, may_be_fast)          \
  MTL_APPROX_UNARY(exp2, C_EXP2, may_be_fast)        \
  MTL_APPROX_UNARY(exp10, C_EXP10, may_be_fast)      \
  MTL_APPROX_UNARY(log, C_LOG, may_be_fast)          \
  MTL_APPROX_UNARY(log2, C_LOG2, may_be_fast)        \
  MTL_APPROX_UNARY(log10, C_LOG10, may_be_fast)      \
  MTL_APPROX_UNARY(sqrt, C_SQRT, may_be_fast)        \
  MTL_APPROX_UNARY(rsqrt, C_RSQRT, may_be_fast)      \
  MTL_APPROX_UNARY(sin, C_SIN, may_be_fast)          \
  MTL_APPROX_UNARY(cos, C_COS, may_be_fast)          \
  MTL_APPROX_UNARY(tan, C_TAN, may_be_fast)          \
  MTL_APPROX_UNARY(asin, C_ASIN, may_be_fast)        \
  MTL_APPROX_UNARY(acos, C_ACOS, may_be_fast)        \
  MTL_APPROX_UNARY(atan, C_ATAN, may_be_fast)        \
  MTL_APPROX_UNARY(sinh, C_SINH, may_be_fast)        \
  MTL_APPROX_UNARY(cosh, C_COSH, may_be_fast)        \
  MTL_APPROX_UNARY(tanh, C_TANH, may_be_fast)        \
  MTL_APPROX_UNARY(asinh, C_ASINH, may_be_fast)      \
  MTL_APPROX_UNARY(acosh, C_ACOSH, may_be_fast)      \
  MTL_APPROX_UNARY(atanh, C_ATANH, may_be_fast)      \
  MTL_APPROX_BINARY(pow, C_POW, may_be_fast)         \
  MTL_APPROX_BINARY(powr, C_POWR, may_be_fast)       \
  MTL_APPROX_BINARY(atan2, C_ATAN2, may_be_fast)     \
  MTL_APPROX_BINARY(divide, C_FIXED, may_be_fast)

MTL_APPROX_FUNCTIONS(true)
namespace precise {
MTL_APPROX_FUNCTIONS(false)
}

// Not Metal built-ins, but in MLX's prelude or commonly written: CPU results.
MTL_APPROX_UNARY(erf, C_ERF, false)
MTL_APPROX_UNARY(expm1, C_EXPM1, false)
MTL_APPROX_UNARY(log1p, C_LOG1P, false)
#undef MTL_APPROX_FUNCTIONS
#undef MTL_APPROX_BINARY
#undef MTL_APPROX_UNARY

template <class T, if_scalar<T> = 0>
inline T abs(T t) {
  if constexpr (mtl::is_float_scalar<T>::value) {
    return T(__builtin_fabsf(float(t)));
  } else {
    return t < 0 ? T(-t) : t;
  }
}
template <class T, int N>
inline vec<T, N> abs(const vec<T, N>& a) {
  vec<T, N> r;
  for (int i = 0; i < N; i++) {
    r.v[i] = abs(a.v[i]);
  }
  return r;
}

#define MTL_PRED(name, expr)                  \
  template <class T, if_float<T> = 0>         \
  inline bool name(T t) {                     \
    float x = float(t);                       \
    return expr;                              \
  }                                           \
  template <class T, int N>                   \
  inline vec<bool, N> name(const vec<T, N>& a) { \
    vec<bool, N> r;                           \
    for (int i = 0; i < N; i++) {             \
      r.v[i] = name(a.v[i]);                  \
    }                                         \
    return r;                                 \
  }
MTL_PRED(isnan, x != x)
MTL_PRED(isinf, __builtin_isinf(x))
MTL_PRED(isfinite, __builtin_isfinite(x))
MTL_PRED(signbit, __builtin_signbit(x))
#undef MTL_PRED

// Two-argument functions: same-type scalars, vectors, and vector with scalar.
#define MTL_BINARY(name, fexpr, iexpr)                                \
  template <class T, if_scalar<T> = 0>                                \
  inline T name(T a, T b) {                                           \
    if constexpr (mtl::is_float_scalar<T>::value) {                   \
      float x = float(a), y = float(b);                               \
      return T(fexpr);                                                \
    } else {                                                          \
      return iexpr;                                                   \
    }                                                                 \
  }                                                                   \
  MTL_ELEMENTWISE2(name)

MTL_BINARY(max, (x > y || y != y) ? x : y, a > b ? a : b)
MTL_BINARY(min, (x < y || y != y) ? x : y, a < b ? a : b)
MTL_BINARY(fmax, (x > y || y != y) ? x : y, a > b ? a : b)
MTL_BINARY(fmin, (x < y || y != y) ? x : y, a < b ? a : b)
MTL_BINARY(fmod, __builtin_fmodf(x, y), a % b)
MTL_BINARY(copysign, __builtin_copysignf(x, y), a)
MTL_BINARY(step, y < x ? 0.0f : 1.0f, b < a ? 0 : 1)
#undef MTL_BINARY

template <class T, if_scalar<T> = 0>
inline T fma(T a, T b, T c) {
  return T(__builtin_fmaf(float(a), float(b), float(c)));
}
template <class T, int N>
inline vec<T, N> fma(const vec<T, N>& a, const vec<T, N>& b, const vec<T, N>& c) {
  vec<T, N> r;
  for (int i = 0; i < N; i++) {
    r.v[i] = fma(a.v[i], b.v[i], c.v[i]);
  }
  return r;
}

template <class T, class L, class H, std::enable_if_t<!mtl::any_swizzle<T, L, H>, int> = 0>
inline T clamp(T x, L lo, H hi) {
  return min(max(x, lo), hi);
}

template <class T, class U, if_scalar<T> = 0>
inline T mix(T a, T b, U t) {
  return T(float(a) + (float(b) - float(a)) * float(t));
}
template <class T, int N, class U>
inline vec<T, N> mix(const vec<T, N>& a, const vec<T, N>& b, const U& t) {
  auto vt = vec<T, N>(t);
  vec<T, N> r;
  for (int i = 0; i < N; i++) {
    r.v[i] = mix(a.v[i], b.v[i], vt.v[i]);
  }
  return r;
}

template <class T, if_scalar<T> = 0>
inline T select(T a, T b, bool c) {
  return c ? b : a;
}
template <class T, int N>
inline vec<T, N> select(const vec<T, N>& a, const vec<T, N>& b, const vec<bool, N>& c) {
  vec<T, N> r;
  for (int i = 0; i < N; i++) {
    r.v[i] = c.v[i] ? b.v[i] : a.v[i];
  }
  return r;
}
template <class T, int N>
inline vec<T, N> select(const vec<T, N>& a, const vec<T, N>& b, bool c) {
  return c ? b : a;
}

template <class T, class U, class V>
inline T max3(T a, U b, V c) {
  return max(max(a, b), c);
}
template <class T, class U, class V>
inline T min3(T a, U b, V c) {
  return min(min(a, b), c);
}

template <class T, int N>
inline T dot(const vec<T, N>& a, const vec<T, N>& b) {
  float s = 0.0f;
  for (int i = 0; i < N; i++) {
    s += float(a.v[i]) * float(b.v[i]);
  }
  return T(s);
}
template <class T, int N>
inline T length(const vec<T, N>& a) {
  return T(__builtin_sqrtf(float(dot(a, a))));
}
template <class T, int N>
inline vec<T, N> normalize(const vec<T, N>& a) {
  return a * T(1.0f / __builtin_sqrtf(float(dot(a, a))));
}
template <int N>
inline bool all(const vec<bool, N>& a) {
  for (int i = 0; i < N; i++) {
    if (!a.v[i]) return false;
  }
  return true;
}
template <int N>
inline bool any(const vec<bool, N>& a) {
  for (int i = 0; i < N; i++) {
    if (a.v[i]) return true;
  }
  return false;
}
inline bool all(bool a) { return a; }
inline bool any(bool a) { return a; }

#define MTL_SWIZZLE_ARGS1(name)                                          \
  template <class A, std::enable_if_t<mtl::any_swizzle<A>, int> = 0>     \
  inline auto name(const A& a) {                                         \
    return name(mtl::as_vec(a));                                         \
  }
#define MTL_SWIZZLE_ARGS2(name)                                            \
  template <class A, class B, std::enable_if_t<mtl::any_swizzle<A, B>, int> = 0> \
  inline auto name(const A& a, const B& b) {                               \
    return name(mtl::as_vec(a), mtl::as_vec(b));                           \
  }
#define MTL_SWIZZLE_ARGS3(name)                                                  \
  template <class A, class B, class C, std::enable_if_t<mtl::any_swizzle<A, B, C>, int> = 0> \
  inline auto name(const A& a, const B& b, const C& c) {                         \
    return name(mtl::as_vec(a), mtl::as_vec(b), mtl::as_vec(c));                 \
  }
MTL_SWIZZLE_ARGS1(length)
MTL_SWIZZLE_ARGS1(normalize)
MTL_SWIZZLE_ARGS1(all)
MTL_SWIZZLE_ARGS1(any)
MTL_SWIZZLE_ARGS1(abs)
MTL_SWIZZLE_ARGS2(dot)
MTL_SWIZZLE_ARGS2(max)
MTL_SWIZZLE_ARGS2(min)
MTL_SWIZZLE_ARGS2(fmax)
MTL_SWIZZLE_ARGS2(fmin)
MTL_SWIZZLE_ARGS2(fmod)
MTL_SWIZZLE_ARGS2(copysign)
MTL_SWIZZLE_ARGS2(step)
MTL_SWIZZLE_ARGS3(fma)
MTL_SWIZZLE_ARGS3(clamp)
MTL_SWIZZLE_ARGS3(mix)
MTL_SWIZZLE_ARGS3(select)
#undef MTL_SWIZZLE_ARGS1
#undef MTL_SWIZZLE_ARGS2
#undef MTL_SWIZZLE_ARGS3

template <class T, std::enable_if_t<std::is_integral<T>::value, int> = 0>
inline T popcount(T x) {
  return T(__builtin_popcountll((unsigned long long)(std::make_unsigned_t<T>)x));
}
template <class T, std::enable_if_t<std::is_integral<T>::value, int> = 0>
inline T clz(T x) {
  constexpr int bits = 8 * sizeof(T);
  auto u = (unsigned long long)(std::make_unsigned_t<T>)x;
  return u == 0 ? T(bits) : T(__builtin_clzll(u) - (64 - bits));
}
template <class T, std::enable_if_t<std::is_integral<T>::value, int> = 0>
inline T ctz(T x) {
  auto u = (unsigned long long)(std::make_unsigned_t<T>)x;
  return u == 0 ? T(8 * sizeof(T)) : T(__builtin_ctzll(u));
}

// The functions whose fast:: and precise:: variants are the same.
#define MTL_EXACT_NAMES(X)                                                    \
  X(floor) X(ceil) X(round) X(rint) X(trunc) X(fract) X(fabs) X(abs)         \
  X(saturate) X(sign) X(isnan) X(isinf) X(isfinite) X(max) X(min) X(fmax)   \
  X(fmin) X(fmod) X(copysign) X(step) X(fma) X(clamp) X(mix) X(max3)        \
  X(min3) X(dot) X(length) X(normalize)
#define MTL_APPROX_NAMES(X)                                                   \
  X(exp) X(exp2) X(exp10) X(log) X(log2) X(log10) X(sqrt) X(rsqrt) X(sin)    \
  X(cos) X(tan) X(asin) X(acos) X(atan) X(sinh) X(cosh) X(tanh) X(asinh)     \
  X(acosh) X(atanh) X(pow) X(powr) X(atan2) X(divide)
#define MTL_USING(name) using metal::name;
namespace fast {
MTL_EXACT_NAMES(MTL_USING)
MTL_APPROX_NAMES(MTL_USING)
}
namespace precise {
MTL_EXACT_NAMES(MTL_USING)
}
#undef MTL_USING
#undef MTL_APPROX_NAMES
#undef MTL_EXACT_NAMES

// ------------------------------------------------------ numeric_limits --

template <class T>
struct numeric_limits;

template <>
struct numeric_limits<float> {
  static constexpr bool is_signed = true;
  static float max() { return mtl::bits_to_float(0x7f7fffffu); }
  static float min() { return mtl::bits_to_float(0x00800000u); }
  static float lowest() { return -max(); }
  static float epsilon() { return mtl::bits_to_float(0x34000000u); }
  static float infinity() { return __builtin_inff(); }
  static float quiet_NaN() { return __builtin_nanf(""); }
  static float denorm_min() { return mtl::bits_to_float(1u); }
};
template <>
struct numeric_limits<half> {
  static constexpr bool is_signed = true;
  static half max() { return half(65504.0f); }
  static half min() { return half(6.103515625e-05f); }
  static half lowest() { return half(-65504.0f); }
  static half epsilon() { return half(0.0009765625f); }
  static half infinity() { return half(__builtin_inff()); }
  static half quiet_NaN() { return half(__builtin_nanf("")); }
};
template <>
struct numeric_limits<bfloat> {
  static constexpr bool is_signed = true;
  static bfloat from_bits(uint16_t b) {
    bfloat r;
    r.bits = b;
    return r;
  }
  static bfloat max() { return from_bits(0x7f7f); }
  static bfloat min() { return from_bits(0x0080); }
  static bfloat lowest() { return from_bits(0xff7f); }
  static bfloat epsilon() { return from_bits(0x3c00); }
  static bfloat infinity() { return from_bits(0x7f80); }
  static bfloat quiet_NaN() { return from_bits(0x7fc0); }
};
template <class T>
struct int_limits {
  static constexpr bool is_signed = static_cast<T>(-1) < static_cast<T>(0);
  static constexpr T max() {
    return is_signed ? static_cast<T>((1ull << (8 * sizeof(T) - 1)) - 1ull)
                     : static_cast<T>(~0ull);
  }
  static constexpr T min() {
    return is_signed ? static_cast<T>(-static_cast<long long>(max()) - 1ll)
                     : static_cast<T>(0);
  }
  static constexpr T lowest() { return min(); }
};
#define MTL_INT_LIMITS(T) \
  template <>             \
  struct numeric_limits<T> : int_limits<T> {};
MTL_INT_LIMITS(char)
MTL_INT_LIMITS(signed char)
MTL_INT_LIMITS(unsigned char)
MTL_INT_LIMITS(short)
MTL_INT_LIMITS(unsigned short)
MTL_INT_LIMITS(int)
MTL_INT_LIMITS(unsigned int)
MTL_INT_LIMITS(long)
MTL_INT_LIMITS(unsigned long)
MTL_INT_LIMITS(long long)
MTL_INT_LIMITS(unsigned long long)
#undef MTL_INT_LIMITS

// ---------------------------------------------------------------- as_type --

template <class T, class U>
inline T as_type(const U& u) {
  static_assert(sizeof(T) == sizeof(U), "as_type needs types of the same size");
  T t;
  std::memcpy(&t, &u, sizeof(T));
  return t;
}

// ---------------------------------------------------------------- atomics --
// Threads never run at the same time, so plain reads and writes are atomic.

enum memory_order { memory_order_relaxed, memory_order_seq_cst };

template <class T>
struct atomic {
  T value;
};
typedef atomic<int> atomic_int;
typedef atomic<uint> atomic_uint;
typedef atomic<float> atomic_float;
typedef atomic<bool> atomic_bool;

template <class T, class U>
MTL_NOINSTR inline void atomic_store_explicit(volatile atomic<T>* a, U v, memory_order) {
  mtl::atomic_op((const void*)a, false, 0.0f);
  const_cast<atomic<T>*>(a)->value = T(v);
}
template <class T>
MTL_NOINSTR inline T atomic_load_explicit(const volatile atomic<T>* a, memory_order) {
  mtl::atomic_op((const void*)a, false, 0.0f);
  return const_cast<const atomic<T>*>(a)->value;
}
template <class T, class U>
MTL_NOINSTR inline T atomic_exchange_explicit(volatile atomic<T>* a, U v, memory_order) {
  auto* p = const_cast<atomic<T>*>(a);
  mtl::atomic_op(p, false, 0.0f);
  T old = p->value;
  p->value = T(v);
  return old;
}
// Float additions are where atomics make results depend on the order: the
// runtime keeps, per output element, how many there were and the sum of
// their magnitudes, which bounds that dependence (see execute.py).
#define MTL_ATOMIC_RMW(name, expr, adds)                                \
  template <class T, class U>                                           \
  MTL_NOINSTR inline T atomic_fetch_##name##_explicit(                  \
      volatile atomic<T>* a, U u, memory_order) {                       \
    auto* p = const_cast<atomic<T>*>(a);                                \
    T old = p->value;                                                   \
    T v = T(u);                                                         \
    mtl::atomic_op(p, adds && std::is_same<T, float>::value, float(v)); \
    p->value = T(expr);                                                 \
    return old;                                                         \
  }
MTL_ATOMIC_RMW(add, old + v, true)
MTL_ATOMIC_RMW(sub, old - v, true)
MTL_ATOMIC_RMW(max, old > v ? old : v, false)
MTL_ATOMIC_RMW(min, old < v ? old : v, false)
MTL_ATOMIC_RMW(and, old & v, false)
MTL_ATOMIC_RMW(or, old | v, false)
MTL_ATOMIC_RMW(xor, old ^ v, false)
#undef MTL_ATOMIC_RMW
template <class T, class U>
MTL_NOINSTR inline bool atomic_compare_exchange_weak_explicit(
    volatile atomic<T>* a, T* expected, U desired, memory_order, memory_order) {
  auto* p = const_cast<atomic<T>*>(a);
  mtl::atomic_op(p, false, 0.0f);
  if (p->value == *expected) {
    p->value = T(desired);
    return true;
  }
  *expected = p->value;
  return false;
}


} // namespace metal

using namespace metal;

namespace metal {

// A barrier orders execution; it orders threadgroup memory only with
// mem_threadgroup in its flags (mem_none synchronises execution alone, and a
// write before it is not guaranteed visible after it).
inline void threadgroup_barrier(mem_flags flags, int line = __builtin_LINE()) {
  mtl::park(mtl::W_BARRIER, "threadgroup_barrier", line, mtl::C_BARRIER_TG, int(flags));
}
inline void simdgroup_barrier(mem_flags flags, int line = __builtin_LINE()) {
  uint32_t active;
  char none = 0;
  mtl::simd_exchange(
      &none, 1, "simdgroup_barrier", mtl::C_BARRIER_SG, line, &active, int(flags));
}

// ------------------------------------------------------- simd collectives --

// Collectives exchange values through the runtime's slots, never kernel
// memory, so they are left out of the instrumentation (MTL_NOINSTR).
template <class T>
MTL_NOINSTR inline T simd_lane_value(const mtl::Slot* slots, int lane) {
  T t;
  std::memcpy(&t, slots[lane].b, sizeof(T));
  return t;
}

#define MTL_SIMD_BEGIN(opname, counter)                                     \
  static_assert(sizeof(T) <= 64, "simd value too large");                   \
  uint32_t active;                                                          \
  const mtl::Slot* slots =                                                  \
      mtl::simd_exchange(&x, sizeof(T), opname, mtl::counter, line, &active); \
  int me = int(mtl::self().a.thread_index_in_simdgroup);                    \
  (void)me;

template <int kind, class T>
MTL_NOINSTR inline T simd_reduce_(const mtl::Slot* slots, uint32_t active, int upto) {
  bool first = true;
  T acc{};
  for (int l = 0; l < upto; l++) {
    if (!(active >> l & 1u)) continue;
    T v = simd_lane_value<T>(slots, l);
    if (first) {
      acc = v;
      first = false;
    } else if constexpr (kind == 0) {
      acc = T(acc + v);
    } else if constexpr (kind == 1) {
      acc = T(acc * v);
    } else if constexpr (kind == 2) {
      acc = max(acc, v);
    } else if constexpr (kind == 3) {
      acc = min(acc, v);
    } else if constexpr (kind == 4) {
      acc = T(acc & v);
    } else if constexpr (kind == 5) {
      acc = T(acc | v);
    } else if constexpr (kind == 6) {
      acc = T(acc ^ v);
    }
  }
  return acc;
}

#define MTL_SIMD_REDUCE(name, kind, counter)                             \
  template <class T>                                                     \
  MTL_NOINSTR inline T name(T x, int line = __builtin_LINE()) {          \
    MTL_SIMD_BEGIN(#name, counter)                                       \
    return simd_reduce_<kind, T>(slots, active, 32);                     \
  }
MTL_SIMD_REDUCE(simd_sum, 0, C_SIMD_SUM)
MTL_SIMD_REDUCE(simd_product, 1, C_SIMD_PRODUCT)
MTL_SIMD_REDUCE(simd_max, 2, C_SIMD_MAX)
MTL_SIMD_REDUCE(simd_min, 3, C_SIMD_MIN)
MTL_SIMD_REDUCE(simd_and, 4, C_SIMD_AND)
MTL_SIMD_REDUCE(simd_or, 5, C_SIMD_OR)
MTL_SIMD_REDUCE(simd_xor, 6, C_SIMD_XOR)
#undef MTL_SIMD_REDUCE

template <class T>
MTL_NOINSTR inline T simd_prefix_inclusive_sum(T x, int line = __builtin_LINE()) {
  MTL_SIMD_BEGIN("simd_prefix_inclusive_sum", C_SIMD_PREFIX_INCLUSIVE_SUM)
  return simd_reduce_<0, T>(slots, active, me + 1);
}
template <class T>
MTL_NOINSTR inline T simd_prefix_exclusive_sum(T x, int line = __builtin_LINE()) {
  MTL_SIMD_BEGIN("simd_prefix_exclusive_sum", C_SIMD_PREFIX_EXCLUSIVE_SUM)
  if ((active & ((1u << me) - 1u)) == 0) return T(0);
  return simd_reduce_<0, T>(slots, active, me);
}
template <class T>
MTL_NOINSTR inline T simd_prefix_inclusive_product(T x, int line = __builtin_LINE()) {
  MTL_SIMD_BEGIN("simd_prefix_inclusive_product", C_SIMD_PREFIX_INCLUSIVE_PRODUCT)
  return simd_reduce_<1, T>(slots, active, me + 1);
}
template <class T>
MTL_NOINSTR inline T simd_prefix_exclusive_product(T x, int line = __builtin_LINE()) {
  MTL_SIMD_BEGIN("simd_prefix_exclusive_product", C_SIMD_PREFIX_EXCLUSIVE_PRODUCT)
  if ((active & ((1u << me) - 1u)) == 0) return T(1);
  return simd_reduce_<1, T>(slots, active, me);
}

// A lane reading from an inactive or out-of-range lane gets its own value.
template <class T>
MTL_NOINSTR inline T simd_take_(const mtl::Slot* slots, uint32_t active, int src, const T& own) {
  if (src < 0 || src > 31 || !(active >> src & 1u)) return own;
  return simd_lane_value<T>(slots, src);
}

template <class T, class I>
MTL_NOINSTR inline T simd_shuffle(T x, I lane, int line = __builtin_LINE()) {
  MTL_SIMD_BEGIN("simd_shuffle", C_SIMD_SHUFFLE)
  return simd_take_(slots, active, int(lane), x);
}
template <class T, class I>
MTL_NOINSTR inline T simd_broadcast(T x, I lane, int line = __builtin_LINE()) {
  MTL_SIMD_BEGIN("simd_broadcast", C_SIMD_BROADCAST)
  return simd_take_(slots, active, int(lane), x);
}
template <class T>
MTL_NOINSTR inline T simd_broadcast_first(T x, int line = __builtin_LINE()) {
  MTL_SIMD_BEGIN("simd_broadcast_first", C_SIMD_BROADCAST_FIRST)
  return simd_take_(slots, active, active ? __builtin_ctz(active) : me, x);
}
template <class T, class I>
MTL_NOINSTR inline T simd_shuffle_xor(T x, I mask, int line = __builtin_LINE()) {
  MTL_SIMD_BEGIN("simd_shuffle_xor", C_SIMD_SHUFFLE_XOR)
  return simd_take_(slots, active, me ^ int(mask), x);
}
template <class T, class I>
MTL_NOINSTR inline T simd_shuffle_down(T x, I delta, int line = __builtin_LINE()) {
  MTL_SIMD_BEGIN("simd_shuffle_down", C_SIMD_SHUFFLE_DOWN)
  return simd_take_(slots, active, me + int(delta), x);
}
template <class T, class I>
MTL_NOINSTR inline T simd_shuffle_up(T x, I delta, int line = __builtin_LINE()) {
  MTL_SIMD_BEGIN("simd_shuffle_up", C_SIMD_SHUFFLE_UP)
  return simd_take_(slots, active, me - int(delta), x);
}
template <class T, class I>
MTL_NOINSTR inline T simd_shuffle_rotate_down(T x, I delta, int line = __builtin_LINE()) {
  MTL_SIMD_BEGIN("simd_shuffle_rotate_down", C_SIMD_SHUFFLE_ROTATE_DOWN)
  return simd_take_(slots, active, (me + int(delta)) & 31, x);
}
template <class T, class I>
MTL_NOINSTR inline T simd_shuffle_rotate_up(T x, I delta, int line = __builtin_LINE()) {
  MTL_SIMD_BEGIN("simd_shuffle_rotate_up", C_SIMD_SHUFFLE_ROTATE_UP)
  return simd_take_(slots, active, (me - int(delta)) & 31, x);
}
MTL_NOINSTR inline bool simd_all(bool x, int line = __builtin_LINE()) {
  using T = bool;
  MTL_SIMD_BEGIN("simd_all", C_SIMD_ALL)
  for (int l = 0; l < 32; l++) {
    if ((active >> l & 1u) && !simd_lane_value<bool>(slots, l)) return false;
  }
  return true;
}
MTL_NOINSTR inline bool simd_any(bool x, int line = __builtin_LINE()) {
  using T = bool;
  MTL_SIMD_BEGIN("simd_any", C_SIMD_ANY)
  for (int l = 0; l < 32; l++) {
    if ((active >> l & 1u) && simd_lane_value<bool>(slots, l)) return true;
  }
  return false;
}
#undef MTL_SIMD_BEGIN

// ------------------------------------------------------- simdgroup_matrix --
// Lane l of the SIMD group holds row (qid & 4) + (l / 2) % 4, columns
// c and c + 1 with c = (qid & 2) * 2 + (l % 2) * 2, where qid = l / 4: the
// layout that Apple GPUs use and MLX's steel kernels index with.

MTL_NOINSTR inline void simdgroup_coord(int lane, int& row, int& col) {
  int qid = lane / 4;
  row = (qid & 4) + (lane / 2) % 4;
  col = (qid & 2) * 2 + (lane % 2) * 2;
}

template <class T, int R, int C>
struct simdgroup_matrix {
  static_assert(R == 8 && C == 8, "the emulator supports 8x8 simdgroup matrices");
  vec<T, 2> e;

  simdgroup_matrix() = default;
  // Metal's scalar constructor makes a diagonal matrix.
  explicit simdgroup_matrix(T d) {
    int row, col;
    simdgroup_coord(int(mtl::self().a.thread_index_in_simdgroup), row, col);
    e.v[0] = row == col ? d : T(0);
    e.v[1] = row == col + 1 ? d : T(0);
  }
  vec<T, 2>& thread_elements() {
    return e;
  }
  const vec<T, 2>& thread_elements() const {
    return e;
  }
};

typedef simdgroup_matrix<float, 8, 8> simdgroup_float8x8;
typedef simdgroup_matrix<half, 8, 8> simdgroup_half8x8;
typedef simdgroup_matrix<bfloat, 8, 8> simdgroup_bfloat8x8;

template <class T>
inline simdgroup_matrix<T, 8, 8> make_filled_simdgroup_matrix(T v) {
  simdgroup_matrix<T, 8, 8> m;
  m.e.v[0] = v;
  m.e.v[1] = v;
  return m;
}
template <class T, int R, int C>
inline simdgroup_matrix<T, R, C> make_filled_simdgroup_matrix(T v) {
  return make_filled_simdgroup_matrix<T>(v);
}

// Metal's simdgroup_load and simdgroup_store take a pointer to the matrix's
// own element type: a float fragment cannot be loaded from a half tile. One
// template parameter for both arguments makes such a call fail to compile
// here as it does on Metal.
template <class T>
inline void simdgroup_load(
    simdgroup_matrix<T, 8, 8>& m,
    const T* src,
    size_t elements_per_row = 8,
    ulong2 origin = ulong2(0, 0),
    bool transpose = false) {
  int row, col;
  int lane = int(mtl::self().a.thread_index_in_simdgroup);
  if (lane == 0) mtl::count(mtl::C_SG_LOAD);
  simdgroup_coord(lane, row, col);
  for (int j = 0; j < 2; j++) {
    size_t r = transpose ? size_t(col + j) : size_t(row);
    size_t c = transpose ? size_t(row) : size_t(col + j);
    m.e.v[j] = src[(origin.y + r) * elements_per_row + origin.x + c];
  }
}

template <class T>
inline void simdgroup_store(
    const simdgroup_matrix<T, 8, 8>& m,
    T* dst,
    size_t elements_per_row = 8,
    ulong2 origin = ulong2(0, 0),
    bool transpose = false) {
  int row, col;
  int lane = int(mtl::self().a.thread_index_in_simdgroup);
  if (lane == 0) mtl::count(mtl::C_SG_STORE);
  simdgroup_coord(lane, row, col);
  for (int j = 0; j < 2; j++) {
    size_t r = transpose ? size_t(col + j) : size_t(row);
    size_t c = transpose ? size_t(row) : size_t(col + j);
    dst[(origin.y + r) * elements_per_row + origin.x + c] = m.e.v[j];
  }
}

// Products read fragments (registers) only.
template <class TD, class TA, class TB, class TC>
MTL_NOINSTR inline void simdgroup_multiply_accumulate(
    simdgroup_matrix<TD, 8, 8>& d,
    const simdgroup_matrix<TA, 8, 8>& a,
    const simdgroup_matrix<TB, 8, 8>& b,
    const simdgroup_matrix<TC, 8, 8>& c,
    int line = __builtin_LINE()) {
  float x[6] = {
      float(a.e.v[0]), float(a.e.v[1]), float(b.e.v[0]),
      float(b.e.v[1]), float(c.e.v[0]), float(c.e.v[1])};
  uint32_t active;
  const mtl::Slot* slots =
      mtl::simd_exchange(x, sizeof(x), "simdgroup_multiply_accumulate", mtl::C_MMA, line, &active);
  if (active != 0xffffffffu) {
    mtl::fail(2, "simdgroup_multiply_accumulate needs all 32 lanes of the SIMD group");
    mtl::park(mtl::W_NONE, "error", line);
  }
  float A[8][8], B[8][8];
  for (int l = 0; l < 32; l++) {
    const float* p = reinterpret_cast<const float*>(slots[l].b);
    int r, cc;
    simdgroup_coord(l, r, cc);
    A[r][cc] = p[0];
    A[r][cc + 1] = p[1];
    B[r][cc] = p[2];
    B[r][cc + 1] = p[3];
  }
  int row, col;
  simdgroup_coord(int(mtl::self().a.thread_index_in_simdgroup), row, col);
  for (int j = 0; j < 2; j++) {
    float acc = x[4 + j];
    for (int k = 0; k < 8; k++) {
      acc += A[row][k] * B[k][col + j];
    }
    d.e.v[j] = TD(acc);
  }
}

template <class TD, class TA, class TB>
MTL_NOINSTR inline void simdgroup_multiply(
    simdgroup_matrix<TD, 8, 8>& d,
    const simdgroup_matrix<TA, 8, 8>& a,
    const simdgroup_matrix<TB, 8, 8>& b,
    int line = __builtin_LINE()) {
  simdgroup_multiply_accumulate(d, a, b, make_filled_simdgroup_matrix<TD>(TD(0)), line);
}

} // namespace metal

// ---------------------------------------------- MLX's prelude (utils.h) --
// The names MLX puts before every custom kernel that kernels commonly use.

template <class StrideT, class IdxT = StrideT>
inline IdxT elem_to_loc(
    IdxT elem, const int* shape, const StrideT* strides, int ndim) {
  IdxT loc = 0;
  for (int i = ndim - 1; i >= 0 && elem > 0; --i) {
    loc += (elem % shape[i]) * IdxT(strides[i]);
    elem /= shape[i];
  }
  return loc;
}

// --------------------------------------------------------------- launcher --

namespace mtl {

// Buffer arguments as the kernel signature declares them: pointers, or
// references to a single value (MLX's `const constant int& x_ndim`).
template <class P>
struct Binder {
  static P get(void* p) { return *static_cast<std::remove_reference_t<P>*>(p); }
};
template <class T>
struct Binder<T*> {
  static T* get(void* p) { return static_cast<T*>(p); }
};
template <class T>
struct Binder<T&> {
  static T& get(void* p) { return *static_cast<T*>(p); }
};
template <class P>
inline P bind(void* p) {
  return Binder<P>::get(p);
}

} // namespace mtl

static void mtl_kernel_entry(void** bufs, const mtl::Attrs& a);

namespace mtl {

MTL_NOINSTR inline void fiber_main() {
  Fiber& f = self();
  mtl_kernel_entry(rt->bufs, f.a);
  f.status = DONE;
  f.wait = W_NONE;
  // Back to the scheduler for good; it never resumes a finished fiber.
  switch_context(f.ctx, rt->sched);
}

inline uint64_t next_random(uint64_t& s) {
  s ^= s << 13;
  s ^= s >> 7;
  s ^= s << 17;
  return s;
}

inline void shuffle(int* a, int n, uint64_t& s) {
  for (int i = n - 1; i > 0; i--) {
    int j = int(next_random(s) % uint64_t(i + 1));
    int t = a[i];
    a[i] = a[j];
    a[j] = t;
  }
}

// Appends "a, b, c-d" style lists of thread indices for messages.
inline void append(char* out, int cap, const char* text) {
  size_t n = std::strlen(out);
  std::strncat(out, text, cap - 1 - n);
}

inline void append_threads(char* out, int cap, const Fiber* fs, const int* ids, int n) {
  char buf[96];
  for (int i = 0; i < n && i < 24; i++) {
    const uint3& p = fs[ids[i]].a.thread_position_in_threadgroup;
    __builtin_snprintf(buf, sizeof(buf), "%s(%u,%u,%u)", i ? ", " : "", p.x, p.y, p.z);
    append(out, cap, buf);
  }
  if (n > 24) {
    __builtin_snprintf(buf, sizeof(buf), " and %d more", n - 24);
    append(out, cap, buf);
  }
}

// Appends "threads waiting at <op> (line <n>): <ids>; " for the threads parked
// on a wait of this kind; ``ids`` is scratch space for r.n thread indices.
inline void append_waiting(Runtime& r, Wait kind, int* ids) {
  int k = 0;
  int line = -1;
  const char* op = "";
  for (int i = 0; i < r.n; i++) {
    if (r.fibers[i].status == WAITING && r.fibers[i].wait == kind) {
      ids[k++] = i;
      line = r.fibers[i].line;
      op = r.fibers[i].op;
    }
  }
  if (k) {
    char buf[256];
    __builtin_snprintf(buf, sizeof(buf), "threads waiting at %s (line %d): ", op, line);
    append(r.msg, r.msg_len, buf);
    append_threads(r.msg, r.msg_len, r.fibers, ids, k);
    append(r.msg, r.msg_len, "; ");
  }
}


// Once every live lane of SIMD group s is blocked, release the lanes that wait
// at a collective: lanes waiting at the same one (same line and operation)
// execute it together, over just those lanes, as the active lanes of
// divergent code do on the GPU. Returns whether any lane was released.
MTL_NOINSTR inline bool release_collectives(int s) {
  Runtime& r = *rt;
  Simd& sg = r.simd[s];
  int parity = sg.gen & 1;
  int live = 0;
  uint32_t pending = 0;
  for (int l = 0; l < 32 && s * 32 + l < r.n; l++) {
    const Fiber& f = r.fibers[s * 32 + l];
    if (f.status == DONE) continue;
    if (f.status == READY) return false;
    live++;
    if (f.wait == W_SIMD) pending |= 1u << l;
  }
  if (pending == 0) return false;
  bool memory_barrier = false;
  while (pending) {
    const Fiber& first = r.fibers[s * 32 + __builtin_ctz(pending)];
    uint32_t mask = 0;
    for (int l = 0; l < 32; l++) {
      if (!(pending >> l & 1u)) continue;
      const Fiber& f = r.fibers[s * 32 + l];
      if (f.line == first.line && std::strcmp(f.op, first.op) == 0) mask |= 1u << l;
    }
    for (int l = 0; l < 32; l++) {
      if (mask >> l & 1u) sg.lane_mask[parity][l] = mask;
    }
    if (first.kind == C_BARRIER_SG && __builtin_popcount(mask) == live &&
        (first.flags & int(mem_flags::mem_threadgroup))) {
      memory_barrier = true;
    }
    if (tracing && r.counters && first.kind >= 0) r.counters[first.kind]++;
    pending &= ~mask;
    for (int l = 0; l < 32; l++) {
      if (mask >> l & 1u) {
        Fiber& f = r.fibers[s * 32 + l];
        f.status = READY;
        f.wait = W_NONE;
      }
    }
  }
  sg.gen++;
  if (memory_barrier) sg.epoch++;
  return true;
}

// Once no thread can run: release the threadgroup if all its live threads
// wait at a barrier (1), finish if all are done (0), else report the
// divergence (-1).
MTL_NOINSTR inline int release_barrier() {
  Runtime& r = *rt;
  int live = 0, at_barrier = 0, done = 0;
  int flags = ~0;
  for (int i = 0; i < r.n; i++) {
    const Fiber& f = r.fibers[i];
    if (f.status == DONE) {
      done++;
    } else {
      live++;
      if (f.status == WAITING && f.wait == W_BARRIER) {
        at_barrier++;
        flags &= f.flags;
      }
    }
  }
  if (live == 0) return 0;
  if (at_barrier == live && done == 0) {
    if (flags & int(mem_flags::mem_threadgroup)) r.tg_epoch++;
    if (tracing && r.counters) r.counters[C_BARRIER_TG]++;
    for (int i = 0; i < r.n; i++) {
      r.fibers[i].status = READY;
      r.fibers[i].wait = W_NONE;
    }
    return 1;
  }
  // Nothing can move: a barrier or collective that not every thread reaches.
  int* ids = new int[r.n];
  const Attrs& g = r.fibers[0].a;
  char buf[256];
  __builtin_snprintf(
      buf, sizeof(buf), "threadgroup (%u,%u,%u) diverges: ",
      g.threadgroup_position_in_grid.x, g.threadgroup_position_in_grid.y,
      g.threadgroup_position_in_grid.z);
  fail(1, buf);
  append_waiting(r, W_BARRIER, ids);
  append_waiting(r, W_SIMD, ids);
  int k = 0;
  for (int i = 0; i < r.n; i++) {
    if (r.fibers[i].status == DONE) ids[k++] = i;
  }
  if (k) {
    append(r.msg, r.msg_len, "threads that returned without reaching it: ");
    append_threads(r.msg, r.msg_len, r.fibers, ids, k);
  }
  delete[] ids;
  return -1;
}

// Runs the ready threads among order[0..n) once each, to their next sync
// point or their end.
MTL_NOINSTR inline void run_pass(const int* order, int n) {
  Runtime& r = *rt;
  for (int k = 0; k < n && !r.error; k++) {
    int i = order[k];
    if (r.fibers[i].status != READY) continue;
    r.cur = i;
    switch_context(r.sched, r.fibers[i].ctx);
  }
}

// One threadgroup under a schedule. Lockstep schedules (forward, reverse,
// shuffled) run every ready thread once per pass, so SIMD groups advance
// together from one collective to the next. Run-ahead schedules (ahead,
// ahead-reverse) run one SIMD group at a time, through its collectives, to
// its next threadgroup barrier while the others wait, first to last or last
// to first: a race between SIMD groups then changes the results.
MTL_NOINSTR inline void run_threadgroup(int schedule, uint64_t& rng) {
  Runtime& r = *rt;
  int n_sg = (r.n + 31) / 32;
  bool ahead = schedule >= 3;
  while (!r.error) {
    if (!ahead) {
      if (schedule == 2) shuffle(r.order, r.n, rng);
      run_pass(r.order, r.n);
      bool released = false;
      for (int s = 0; s < n_sg && !r.error; s++) released |= release_collectives(s);
      if (released) continue;
    } else {
      for (int q = 0; q < n_sg && !r.error; q++) {
        int s = schedule == 4 ? n_sg - 1 - q : q;
        int first = s * 32;
        int lanes = r.n - first < 32 ? r.n - first : 32;
        do {
          run_pass(r.order + (schedule == 4 ? r.n - first - lanes : first), lanes);
        } while (!r.error && release_collectives(s));
      }
    }
    if (r.error || release_barrier() != 1) break;
  }
}

} // namespace mtl

// Names of the fixed counters, comma-separated, in their order.
extern "C" const char* mtl_counter_names() {
#define MTL_COUNTER_NAME(id, name) name ","
  return MTL_COUNTERS(MTL_COUNTER_NAME);
#undef MTL_COUNTER_NAME
}

extern "C" MTL_NOINSTR int mtl_run(mtl::Launch* launch) {
  using namespace mtl;
  Runtime r{};
  rt = &r;
  r.launch = launch;
  r.bufs = launch->bufs;
  r.msg = launch->msg;
  r.msg_len = launch->msg_len;
  r.detect = tracing && launch->detect_races;
  r.fast_math = launch->fast_math != 0;
  r.msg[0] = 0;
  int schedule = launch->schedule;
  if (tracing) {
    Dl_info info;
    if (dladdr((void*)&mtl_counter_names, &info)) r.lib_base = uintptr_t(info.dli_fbase);
  }
  const uint32_t* grid = launch->grid;
  const uint32_t* group = launch->group;
  uint3 g(grid[0], grid[1], grid[2]);
  // Metal clips the threadgroup to the grid (MLX passes min(group, grid)).
  uint3 tg(
      group[0] < grid[0] ? group[0] : grid[0],
      group[1] < grid[1] ? group[1] : grid[1],
      group[2] < grid[2] ? group[2] : grid[2]);
  if (tg.x * tg.y * tg.z == 0) {
    rt = nullptr;
    return 0;
  }
  uint3 ngroups(
      (g.x + tg.x - 1) / tg.x, (g.y + tg.y - 1) / tg.y, (g.z + tg.z - 1) / tg.z);
  int max_threads = int(tg.x * tg.y * tg.z);
  // Each stack sits above an inaccessible guard page, so a kernel that
  // overflows its stack faults instead of overwriting its neighbour's.
  const size_t guard = 4096;
  size_t stack_size = (size_t(launch->stack_size) + guard - 1) & ~(guard - 1);
  r.stack_size = stack_size;
  size_t slot = stack_size + guard;
  size_t stack_bytes = slot * size_t(max_threads);
  r.stacks = (char*)mmap(
      nullptr, stack_bytes, PROT_READ | PROT_WRITE,
      MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (r.stacks == MAP_FAILED) {
    fail(2, "could not map fiber stacks");
    rt = nullptr;
    return 2;
  }
  for (int i = 0; i < max_threads; i++) {
    mprotect(r.stacks + size_t(i) * slot, guard, PROT_NONE);
  }
  r.fibers = new Fiber[max_threads];
  r.order = new int[max_threads];
  r.simd = new Simd[(max_threads + 31) / 32];
  r.tg_cap = 32 * 1024; // Metal's threadgroup memory limit
  r.tg_mem = new unsigned char[r.tg_cap];
  if (r.detect) {
    r.shadow = new Shadow[r.tg_cap];
    std::memset((void*)r.shadow, 0xff, sizeof(Shadow) * r.tg_cap);
  }

  // A launch may run a subset of its threadgroups (launch->only, ascending
  // linear indices): the others are not run at all.
  uint64_t n_groups = launch->only ? launch->n_only : uint64_t(ngroups.x) * ngroups.y * ngroups.z;
  uint64_t rng = launch->seed * 0x9E3779B97F4A7C15ull + 0x2545F4914F6CDD1Dull;
  if (rng == 0) rng = 1;
  // Group order follows the schedule too, so races between threadgroups on
  // device memory show as well.
  bool reversed = schedule == 1 || schedule == 4;
  uint64_t* gorder = new uint64_t[n_groups ? n_groups : 1];
  for (uint64_t i = 0; i < n_groups; i++) {
    uint64_t k = reversed ? n_groups - 1 - i : i;
    gorder[i] = launch->only ? launch->only[k] : k;
  }
  if (schedule == 2 && n_groups > 1) {
    for (uint64_t i = n_groups - 1; i > 0; i--) {
      uint64_t j = next_random(rng) % (i + 1);
      uint64_t t = gorder[i];
      gorder[i] = gorder[j];
      gorder[j] = t;
    }
  }

  auto run_groups = [&]() {
    for (uint64_t gi = 0; gi < n_groups && !r.error; gi++) {
      uint64_t lin = gorder[gi];
      uint3 gp(
          uint(lin % ngroups.x), uint((lin / ngroups.x) % ngroups.y),
          uint(lin / (uint64_t(ngroups.x) * ngroups.y)));
      // Threadgroups at the grid's far edge are smaller (non-uniform groups).
      uint3 size(
          gp.x * tg.x + tg.x <= g.x ? tg.x : g.x - gp.x * tg.x,
          gp.y * tg.y + tg.y <= g.y ? tg.y : g.y - gp.y * tg.y,
          gp.z * tg.z + tg.z <= g.z ? tg.z : g.z - gp.z * tg.z);
      int n = int(size.x * size.y * size.z);
      r.n = n;
      r.counters = (tracing && launch->counters) ? launch->counters + lin * launch->n_counters : nullptr;
      if (r.detect) {
        std::memset((void*)r.shadow, 0xff, sizeof(Shadow) * r.tg_used);
      }
      r.n_tg_vars = 0;
      r.tg_used = 0;
      r.tg_epoch = 0;
      for (int s = 0; s < (n + 31) / 32; s++) {
        r.simd[s].gen = 0;
        r.simd[s].epoch = 0;
      }
      for (int i = 0; i < n; i++) {
        Fiber& f = r.fibers[i];
        Attrs& a = f.a;
        uint3 lp(i % size.x, (i / size.x) % size.y, i / (size.x * size.y));
        a.thread_position_in_threadgroup = lp;
        a.threadgroup_position_in_grid = gp;
        a.thread_position_in_grid = uint3(gp.x * tg.x + lp.x, gp.y * tg.y + lp.y, gp.z * tg.z + lp.z);
        a.threads_per_threadgroup = size;
        a.dispatch_threads_per_threadgroup = tg;
        a.threadgroups_per_grid = ngroups;
        a.threads_per_grid = g;
        a.grid_size = g;
        a.grid_origin = uint3(0, 0, 0);
        a.thread_index_in_threadgroup = uint(i);
        a.simdgroup_index_in_threadgroup = uint(i / 32);
        a.thread_index_in_simdgroup = uint(i % 32);
        a.threads_per_simdgroup = 32;
        a.simdgroups_per_threadgroup = uint((n + 31) / 32);
        a.thread_execution_width = 32;
        a.quadgroup_index_in_threadgroup = uint(i / 4);
        a.thread_index_in_quadgroup = uint(i % 4);
        f.status = READY;
        f.wait = W_NONE;
        f.line = 0;
        f.op = "";
        f.kind = -1;
        f.flags = 0;
        make_context(f.ctx, r.stacks + size_t(i) * slot + guard, stack_size, fiber_main, &r.sched);
        r.order[i] = reversed ? n - 1 - i : i;
      }
      run_threadgroup(schedule, rng);
      if (r.counters) r.counters[C_TG_PEAK] = r.tg_used;
    }
  };

  // A kernel that reads or writes outside its buffers (or overflows its
  // stack) ends this run with an error instead of ending the process.
  static sigjmp_buf fault_jump;
  static volatile void* fault_address;
  struct sigaction on_fault {}, old_segv {}, old_bus {};
  on_fault.sa_sigaction = [](int, siginfo_t* info, void*) {
    fault_address = info->si_addr;
    siglongjmp(fault_jump, 1);
  };
  on_fault.sa_flags = SA_SIGINFO | SA_ONSTACK;
  sigemptyset(&on_fault.sa_mask);
  const size_t alt_size = 1 << 16;
  char* alt_stack = new char[alt_size];
  stack_t alt {}, old_alt {};
  alt.ss_sp = alt_stack;
  alt.ss_size = alt_size;
  sigaltstack(&alt, &old_alt);
  sigaction(SIGSEGV, &on_fault, &old_segv);
  sigaction(SIGBUS, &on_fault, &old_bus);
  if (sigsetjmp(fault_jump, 1) == 0) {
    run_groups();
  } else {
    const Attrs& a = r.fibers[r.cur].a;
    char buf[256];
    __builtin_snprintf(
        buf, sizeof(buf),
        "invalid memory access at %p by thread (%u,%u,%u) of threadgroup "
        "(%u,%u,%u): an index outside a buffer, or a stack overflow",
        (void*)fault_address, a.thread_position_in_threadgroup.x,
        a.thread_position_in_threadgroup.y, a.thread_position_in_threadgroup.z,
        a.threadgroup_position_in_grid.x, a.threadgroup_position_in_grid.y,
        a.threadgroup_position_in_grid.z);
    r.error = 0;
    fail(2, buf);
  }
  sigaction(SIGSEGV, &old_segv, nullptr);
  sigaction(SIGBUS, &old_bus, nullptr);
  sigaltstack(&old_alt, nullptr);
  delete[] alt_stack;

  delete[] gorder;
  delete[] r.shadow;
  delete[] r.tg_mem;
  delete[] r.simd;
  delete[] r.order;
  delete[] r.fibers;
  munmap(r.stacks, stack_bytes);
  rt = nullptr;
  return r.error;
}

// Metal has no double; neither do kernels compiled against this header.
struct double_is_not_supported_in_metal;
#define double double_is_not_supported_in_metal

#define device
#define constant
#define thread
#define threadgroup
