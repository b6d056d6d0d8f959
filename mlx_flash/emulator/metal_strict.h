// Declarations of the Metal standard library (and of MLX's prelude) for the
// emulator's strict pass: a syntax-only compile with clang in C++14 mode, as
// MSL 3.x is, that rejects what Apple's compiler rejects and the CPU build
// accepts. Nothing here is ever run.
//
// * device, constant and threadgroup are real address spaces; an unqualified
//   pointer or reference is in the thread address space, so a pointer cannot
//   silently move between them.
// * half and bfloat are distinct types; math functions have one overload per
//   type, so a mixed-type call is ambiguous where Metal's is.
// * double and the std namespace do not exist; program-scope variables are
//   checked by strict.py (Metal requires the constant address space).
// * Vector types are clang's ext_vector_type (swizzles included); Metal's
//   vector constructors are rewritten to ::metal::make_vector<V>(...), which
//   accepts any components. Boolean vectors are int vectors, the type
//   clang gives a float vector comparison.
#pragma clang system_header

#define device __attribute__((address_space(1)))
#define constant __attribute__((address_space(2)))
#define threadgroup __attribute__((address_space(3)))
#define thread
#define METAL_FUNC inline __attribute__((always_inline))

typedef __SIZE_TYPE__ size_t;
typedef __PTRDIFF_TYPE__ ptrdiff_t;
typedef signed char int8_t;
typedef unsigned char uint8_t;
typedef short int16_t;
typedef unsigned short uint16_t;
typedef int int32_t;
typedef unsigned int uint32_t;
typedef long int64_t;
typedef unsigned long uint64_t;
typedef unsigned char uchar;
typedef unsigned short ushort;
typedef unsigned int uint;
typedef unsigned long ulong;
typedef _Float16 half;
typedef __bf16 bfloat;

#include "metal_shared.h"

namespace metal {

#define MTL_VECTORS(T, name)                              \
  typedef T name##2 __attribute__((ext_vector_type(2))); \
  typedef T name##3 __attribute__((ext_vector_type(3))); \
  typedef T name##4 __attribute__((ext_vector_type(4)));
MTL_VECTORS(float, float)
MTL_VECTORS(half, half)
MTL_VECTORS(bfloat, bfloat)
MTL_VECTORS(int, int)
MTL_VECTORS(uint, uint)
MTL_VECTORS(short, short)
MTL_VECTORS(ushort, ushort)
MTL_VECTORS(char, char)
MTL_VECTORS(uchar, uchar)
MTL_VECTORS(long, long)
MTL_VECTORS(ulong, ulong)
MTL_VECTORS(int, bool)
#undef MTL_VECTORS
template <class T, int N>
using vec = T __attribute__((ext_vector_type(N)));
template <class V, class... Components>
V make_vector(Components... components);

// ----------------------------------------------------------- type traits --
template <class T, T v>
struct integral_constant {
  static constexpr T value = v;
};
typedef integral_constant<bool, true> true_type;
typedef integral_constant<bool, false> false_type;
template <class A, class B>
struct is_same : false_type {};
template <class A>
struct is_same<A, A> : true_type {};
template <bool B, class T = void>
struct enable_if {};
template <class T>
struct enable_if<true, T> {
  typedef T type;
};
template <bool B, class T = void>
using enable_if_t = typename enable_if<B, T>::type;
template <bool B, class T, class F>
struct conditional {
  typedef T type;
};
template <class T, class F>
struct conditional<false, T, F> {
  typedef F type;
};
template <bool B, class T, class F>
using conditional_t = typename conditional<B, T, F>::type;
template <class T>
struct remove_cv {
  typedef T type;
};
template <class T>
struct remove_cv<const T> {
  typedef T type;
};
template <class T>
struct remove_cv<volatile T> {
  typedef T type;
};
template <class T>
struct remove_cv<const volatile T> {
  typedef T type;
};
template <class T>
using remove_cv_t = typename remove_cv<T>::type;
template <class T>
struct is_floating_point
    : integral_constant<
          bool, is_same<remove_cv_t<T>, float>::value || is_same<remove_cv_t<T>, half>::value ||
                    is_same<remove_cv_t<T>, bfloat>::value> {};
template <class T>
struct is_integral : false_type {};
#define MTL_INTEGRAL(T) \
  template <>           \
  struct is_integral<T> : true_type {};
MTL_INTEGRAL(bool)
MTL_INTEGRAL(char)
MTL_INTEGRAL(signed char)
MTL_INTEGRAL(uchar)
MTL_INTEGRAL(short)
MTL_INTEGRAL(ushort)
MTL_INTEGRAL(int)
MTL_INTEGRAL(uint)
MTL_INTEGRAL(long)
MTL_INTEGRAL(ulong)
#undef MTL_INTEGRAL
template <class T>
struct is_arithmetic : integral_constant<bool, is_integral<T>::value || is_floating_point<T>::value> {};
template <class T>
struct is_signed;
template <class T>
struct make_unsigned;

template <class T>
struct numeric_limits {
  static constexpr bool is_signed = true;
  static T max();
  static T min();
  static T lowest();
  static T epsilon();
  static T infinity();
  static T quiet_NaN();
  static T denorm_min();
};

template <class T, class U>
T as_type(U value);

// ------------------------------------------------------------------ math --
// One overload per type: float, half, bfloat (MLX's bf16_math.h), and the
// float and half vectors.
#define MTL_FN1_T(T, name) T name(T x);
#define MTL_FN2_T(T, name) T name(T x, T y);
#define MTL_FN3_T(T, name) T name(T x, T y, T z);
#define MTL_FOR_FLOATS(F, name)                                              \
  F(float, name) F(float2, name) F(float3, name) F(float4, name) F(half, name) \
  F(half2, name) F(half3, name) F(half4, name) F(bfloat, name)
#define MTL_UNARY_NAMES(X)                                                   \
  X(exp) X(exp2) X(exp10) X(log) X(log2) X(log10) X(sqrt) X(rsqrt) X(sin)   \
  X(cos) X(tan) X(asin) X(acos) X(atan) X(sinh) X(cosh) X(tanh) X(asinh)    \
  X(acosh) X(atanh) X(floor) X(ceil) X(round) X(rint) X(trunc) X(fract)     \
  X(fabs) X(saturate) X(sign) X(sinpi) X(cospi) X(tanpi)
#define MTL_BINARY_NAMES(X) \
  X(pow) X(powr) X(atan2) X(fmod) X(copysign) X(step) X(divide) X(fmax) X(fmin) X(fdim) X(nextafter)
#define MTL_TERNARY_NAMES(X) X(fma) X(mix) X(clamp) X(fmax3) X(fmin3) X(fmedian3) X(smoothstep)
#define MTL_DECLARE1(name) MTL_FOR_FLOATS(MTL_FN1_T, name)
#define MTL_DECLARE2(name) MTL_FOR_FLOATS(MTL_FN2_T, name)
#define MTL_DECLARE3(name) MTL_FOR_FLOATS(MTL_FN3_T, name)
MTL_UNARY_NAMES(MTL_DECLARE1)
MTL_BINARY_NAMES(MTL_DECLARE2)
MTL_TERNARY_NAMES(MTL_DECLARE3)
// The variants: float (and MLX's bfloat) only.
#define MTL_VARIANT1(name) float name(float x); float2 name(float2 x); float3 name(float3 x); \
  float4 name(float4 x); bfloat name(bfloat x);
#define MTL_VARIANT2(name) float name(float x, float y); float2 name(float2 x, float2 y);   \
  float3 name(float3 x, float3 y); float4 name(float4 x, float4 y); bfloat name(bfloat x, bfloat y);
#define MTL_VARIANT3(name) float name(float x, float y, float z); float4 name(float4 x, float4 y, float4 z);
#define MTL_VARIANTS                 \
  MTL_UNARY_NAMES(MTL_VARIANT1)      \
  MTL_BINARY_NAMES(MTL_VARIANT2)     \
  MTL_TERNARY_NAMES(MTL_VARIANT3)    \
  float max(float x, float y);       \
  float min(float x, float y);
namespace fast {
MTL_VARIANTS
}
namespace precise {
MTL_VARIANTS
}

// Integer and float functions with one overload per scalar and vector type.
#define MTL_FOR_ALL(F, name)                                                      \
  MTL_FOR_FLOATS(F, name)                                                         \
  F(int, name) F(int2, name) F(int3, name) F(int4, name) F(uint, name)            \
  F(uint2, name) F(uint3, name) F(uint4, name) F(short, name) F(ushort, name)     \
  F(char, name) F(uchar, name) F(long, name) F(ulong, name)
MTL_FOR_ALL(MTL_FN1_T, abs)
MTL_FOR_ALL(MTL_FN2_T, max)
MTL_FOR_ALL(MTL_FN2_T, min)
MTL_FOR_ALL(MTL_FN3_T, max3)
MTL_FOR_ALL(MTL_FN3_T, min3)
MTL_FOR_ALL(MTL_FN3_T, median3)
// clamp is an integer function too (MSL's integer functions), beside the
// float one declared above.
MTL_FOR_ALL(MTL_FN3_T, clamp)
#define MTL_INT_FN1(T, name) T name(T x);
#define MTL_FOR_INTS(F, name) F(int, name) F(uint, name) F(short, name) F(ushort, name) \
  F(char, name) F(uchar, name) F(long, name) F(ulong, name)
MTL_FOR_INTS(MTL_INT_FN1, popcount)
MTL_FOR_INTS(MTL_INT_FN1, clz)
MTL_FOR_INTS(MTL_INT_FN1, ctz)
MTL_FOR_INTS(MTL_INT_FN1, reverse_bits)
template <class T>
bool isnan(T x);
template <class T>
bool isinf(T x);
template <class T>
bool isfinite(T x);
template <class T>
bool signbit(T x);
template <class T>
T select(T a, T b, bool c);
template <class T, class C>
T select(T a, T b, C c);
template <class V>
bool all(V v);
template <class V>
bool any(V v);
template <class V>
auto dot(V a, V b) -> decltype(a.x);
template <class V>
auto length(V a) -> decltype(a.x);
template <class V>
V normalize(V a);
template <class V>
V cross(V a, V b);

// --------------------------------------------------------------- atomics --
enum memory_order { memory_order_relaxed, memory_order_seq_cst };
template <class T>
using atomic = _Atomic(T);
typedef atomic<int> atomic_int;
typedef atomic<uint> atomic_uint;
typedef atomic<float> atomic_float;
typedef atomic<bool> atomic_bool;
typedef atomic<ulong> atomic_ulong;
#define MTL_ATOMIC(T, AS)                                                                  \
  void atomic_store_explicit(volatile AS atomic<T>* object, T desired, memory_order order); \
  T atomic_load_explicit(const volatile AS atomic<T>* object, memory_order order);         \
  T atomic_exchange_explicit(volatile AS atomic<T>* object, T desired, memory_order order); \
  bool atomic_compare_exchange_weak_explicit(                                              \
      volatile AS atomic<T>* object, thread T* expected, T desired, memory_order success,  \
      memory_order failure);                                                               \
  T atomic_fetch_add_explicit(volatile AS atomic<T>* object, T operand, memory_order order); \
  T atomic_fetch_sub_explicit(volatile AS atomic<T>* object, T operand, memory_order order); \
  T atomic_fetch_max_explicit(volatile AS atomic<T>* object, T operand, memory_order order); \
  T atomic_fetch_min_explicit(volatile AS atomic<T>* object, T operand, memory_order order);
#define MTL_ATOMIC_BITS(T, AS)                                                              \
  T atomic_fetch_and_explicit(volatile AS atomic<T>* object, T operand, memory_order order); \
  T atomic_fetch_or_explicit(volatile AS atomic<T>* object, T operand, memory_order order);  \
  T atomic_fetch_xor_explicit(volatile AS atomic<T>* object, T operand, memory_order order);
MTL_ATOMIC(int, device)
MTL_ATOMIC(int, threadgroup)
MTL_ATOMIC(uint, device)
MTL_ATOMIC(uint, threadgroup)
MTL_ATOMIC(float, device)
MTL_ATOMIC(float, threadgroup)
MTL_ATOMIC(ulong, device)
MTL_ATOMIC_BITS(int, device)
MTL_ATOMIC_BITS(int, threadgroup)
MTL_ATOMIC_BITS(uint, device)
MTL_ATOMIC_BITS(uint, threadgroup)
MTL_ATOMIC_BITS(ulong, device)

// -------------------------------------------------------------- barriers --
void threadgroup_barrier(mem_flags flags);
void simdgroup_barrier(mem_flags flags);

// ------------------------------------------------------ simd collectives --
#define MTL_SIMD1(name) \
  template <class T>    \
  T name(T data);
#define MTL_SIMD2(name)   \
  template <class T>      \
  T name(T data, ushort lane);
MTL_SIMD1(simd_sum)
MTL_SIMD1(simd_product)
MTL_SIMD1(simd_max)
MTL_SIMD1(simd_min)
MTL_SIMD1(simd_and)
MTL_SIMD1(simd_or)
MTL_SIMD1(simd_xor)
MTL_SIMD1(simd_prefix_inclusive_sum)
MTL_SIMD1(simd_prefix_exclusive_sum)
MTL_SIMD1(simd_prefix_inclusive_product)
MTL_SIMD1(simd_prefix_exclusive_product)
MTL_SIMD1(simd_broadcast_first)
MTL_SIMD2(simd_shuffle)
MTL_SIMD2(simd_broadcast)
MTL_SIMD2(simd_shuffle_xor)
MTL_SIMD2(simd_shuffle_down)
MTL_SIMD2(simd_shuffle_up)
MTL_SIMD2(simd_shuffle_rotate_down)
MTL_SIMD2(simd_shuffle_rotate_up)
bool simd_all(bool data);
bool simd_any(bool data);

// ------------------------------------------------------ simdgroup_matrix --
template <class T, int Rows, int Cols>
struct simdgroup_matrix {
  simdgroup_matrix();
  explicit simdgroup_matrix(T diagonal);
  thread vec<T, 2>& thread_elements();
};
typedef simdgroup_matrix<float, 8, 8> simdgroup_float8x8;
typedef simdgroup_matrix<half, 8, 8> simdgroup_half8x8;
typedef simdgroup_matrix<bfloat, 8, 8> simdgroup_bfloat8x8;
template <class T, int Rows, int Cols>
simdgroup_matrix<T, Rows, Cols> make_filled_simdgroup_matrix(T value);
// Loads and stores take device or threadgroup memory of the matrix's own
// element type, never thread memory.
template <class T, int R, int C>
void simdgroup_load(
    thread simdgroup_matrix<T, R, C>& d, const device T* src, ulong elements_per_row = C,
    ulong2 matrix_origin = 0, bool transpose_matrix = false);
template <class T, int R, int C>
void simdgroup_load(
    thread simdgroup_matrix<T, R, C>& d, const threadgroup T* src, ulong elements_per_row = C,
    ulong2 matrix_origin = 0, bool transpose_matrix = false);
template <class T, int R, int C>
void simdgroup_store(
    thread const simdgroup_matrix<T, R, C>& a, device T* dst, ulong elements_per_row = C,
    ulong2 matrix_origin = 0, bool transpose_matrix = false);
template <class T, int R, int C>
void simdgroup_store(
    thread const simdgroup_matrix<T, R, C>& a, threadgroup T* dst, ulong elements_per_row = C,
    ulong2 matrix_origin = 0, bool transpose_matrix = false);
template <class TD, class TA, class TB, class TC, int M, int N, int K>
void simdgroup_multiply_accumulate(
    thread simdgroup_matrix<TD, M, N>& d, thread const simdgroup_matrix<TA, M, K>& a,
    thread const simdgroup_matrix<TB, K, N>& b, thread const simdgroup_matrix<TC, M, N>& c);
template <class TD, class TA, class TB, int M, int N, int K>
void simdgroup_multiply(
    thread simdgroup_matrix<TD, M, N>& d, thread const simdgroup_matrix<TA, M, K>& a,
    thread const simdgroup_matrix<TB, K, N>& b);

#undef MTL_FN1_T
#undef MTL_FN2_T
#undef MTL_FN3_T
#undef MTL_FOR_FLOATS
#undef MTL_FOR_ALL
#undef MTL_FOR_INTS
#undef MTL_INT_FN1
#undef MTL_UNARY_NAMES
#undef MTL_BINARY_NAMES
#undef MTL_TERNARY_NAMES
#undef MTL_DECLARE1
#undef MTL_DECLARE2
#undef MTL_DECLARE3
#undef MTL_VARIANT1
#undef MTL_VARIANT2
#undef MTL_VARIANT3
#undef MTL_VARIANTS
#undef MTL_ATOMIC
#undef MTL_ATOMIC_BITS
#undef MTL_SIMD1
#undef MTL_SIMD2

} // namespace metal

using namespace metal;

// Metal's literal suffixes: 0.5h (half), 0.5bf (bfloat).
constexpr half operator""h(long double x) {
  return half(x);
}
constexpr half operator""h(unsigned long long x) {
  return half(x);
}
constexpr bfloat operator""bf(long double x) {
  return bfloat(x);
}

// ---------------------------------------------- MLX's prelude (utils.h) --
typedef half float16_t;
typedef bfloat bfloat16_t;
template <typename IdxT = int64_t>
IdxT elem_to_loc(IdxT elem, constant const int* shape, constant const int64_t* strides, int ndim);
template <typename IdxT = int64_t>
IdxT elem_to_loc(uint3 elem, constant const int* shape, constant const int64_t* strides, int ndim);
template <typename IdxT = int64_t>
IdxT elem_to_loc_1(uint elem, constant const int64_t& stride);
template <typename IdxT = int64_t>
IdxT elem_to_loc_2(uint2 elem, constant const int64_t* strides);
template <typename IdxT = int64_t>
IdxT elem_to_loc_3(uint3 elem, constant const int64_t* strides);
template <typename T, typename U>
T ceildiv(T N, U M);
float log1p(float x);
bfloat16_t log1p(bfloat16_t x);
template <typename U>
struct Limits {
  static const constant U max;
  static const constant U min;
  static const constant U finite_max;
  static const constant U finite_min;
};

// No double in Metal, and no std namespace.
struct double_is_not_supported_in_metal;
#define double double_is_not_supported_in_metal
#define std std_namespace_is_not_available_in_metal
