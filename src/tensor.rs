//! Wire tensors (`stepstream.v1.Tensor`) to and from candle tensors. Every check (dtype, rank,
//! dimensions, checked size arithmetic, byte length, size limit) runs before any allocation.

use candle_core::{DType, Device, Tensor};

use crate::proto;

/// Why a wire tensor was refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TensorError {
    /// The dtype field is unset or unknown.
    #[error("dtype must be DTYPE_F32, DTYPE_F16 or DTYPE_BF16 (got {0})")]
    DType(i32),
    /// The shape is empty, too long, or has a non-positive dimension.
    #[error("invalid shape {shape:?}: {reason}")]
    Shape {
        /// The shape as sent.
        shape: Vec<i64>,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The tensor would exceed the server's size limit.
    #[error("tensor of {bytes} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// The size it would need (saturated on overflow).
        bytes: u128,
        /// The limit.
        limit: usize,
    },
    /// `data` does not hold exactly product(shape) * dtype size bytes.
    #[error("data has {got} bytes but shape {shape:?} in {dtype} needs {expected}")]
    ByteLength {
        /// The shape as sent.
        shape: Vec<i64>,
        /// The dtype name.
        dtype: &'static str,
        /// The bytes needed.
        expected: usize,
        /// The bytes sent.
        got: usize,
    },
    /// A value is NaN or infinite.
    #[error("contains a non-finite value (NaN or infinity) at flat index {0}")]
    NonFinite(usize),
    /// Converting on the device failed.
    #[error("tensor conversion failed: {0}")]
    Candle(String),
}

/// The most dimensions a wire tensor may have.
pub const MAX_RANK: usize = 8;

/// The element size and name of a wire dtype, or an error for unset/unknown values.
pub fn wire_dtype(dtype: i32) -> Result<(proto::DType, usize, &'static str), TensorError> {
    match proto::DType::try_from(dtype) {
        Ok(proto::DType::DtypeF32) => Ok((proto::DType::DtypeF32, 4, "f32")),
        Ok(proto::DType::DtypeF16) => Ok((proto::DType::DtypeF16, 2, "f16")),
        Ok(proto::DType::DtypeBf16) => Ok((proto::DType::DtypeBf16, 2, "bf16")),
        _ => Err(TensorError::DType(dtype)),
    }
}

/// Checks a wire tensor's header against `max_bytes` and returns its dims, without touching data.
pub fn check_header(t: &proto::Tensor, max_bytes: usize) -> Result<Vec<usize>, TensorError> {
    let (_, elem, name) = wire_dtype(t.dtype)?;
    if t.shape.is_empty() || t.shape.len() > MAX_RANK {
        return Err(TensorError::Shape {
            shape: t.shape.clone(),
            reason: "rank must be between 1 and 8",
        });
    }
    let mut n: u128 = 1;
    let mut dims = Vec::with_capacity(t.shape.len());
    for &d in &t.shape {
        if d <= 0 {
            return Err(TensorError::Shape {
                shape: t.shape.clone(),
                reason: "every dimension must be positive",
            });
        }
        n = n.saturating_mul(d as u128);
        dims.push(d as usize);
    }
    let bytes = n.saturating_mul(elem as u128);
    if bytes > max_bytes as u128 {
        return Err(TensorError::TooLarge {
            bytes,
            limit: max_bytes,
        });
    }
    let expected = bytes as usize;
    if t.data.len() != expected {
        return Err(TensorError::ByteLength {
            shape: t.shape.clone(),
            dtype: name,
            expected,
            got: t.data.len(),
        });
    }
    Ok(dims)
}

/// The header-checked dims and the f32 values of a wire tensor.
fn decode_values(
    t: &proto::Tensor,
    max_bytes: usize,
) -> Result<(Vec<usize>, Vec<f32>), TensorError> {
    let dims = check_header(t, max_bytes)?;
    let (dtype, _, _) = wire_dtype(t.dtype)?;
    let values: Vec<f32> = match dtype {
        proto::DType::DtypeF32 => t
            .data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        proto::DType::DtypeF16 => t
            .data
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        proto::DType::DtypeBf16 => t
            .data
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        proto::DType::DtypeUnspecified => unreachable!("rejected by wire_dtype"),
    };
    Ok((dims, values))
}

/// Decodes a wire tensor into an f32 candle tensor on the CPU, refusing non-finite values.
pub fn decode(t: &proto::Tensor, max_bytes: usize) -> Result<Tensor, TensorError> {
    let (dims, values) = decode_values(t, max_bytes)?;
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(TensorError::NonFinite(i));
    }
    Tensor::from_vec(values, dims, &Device::Cpu).map_err(|e| TensorError::Candle(e.to_string()))
}

/// Like [`decode`] but keeps non-finite values (a client reading what the server computed).
pub fn decode_lenient(t: &proto::Tensor, max_bytes: usize) -> Result<Tensor, TensorError> {
    let (dims, values) = decode_values(t, max_bytes)?;
    Tensor::from_vec(values, dims, &Device::Cpu).map_err(|e| TensorError::Candle(e.to_string()))
}

/// The candle dtype a wire dtype is staged in on the device (`Unspecified` means F32).
fn staging_dtype(wire: proto::DType) -> (proto::DType, DType) {
    match wire {
        proto::DType::DtypeF16 => (wire, DType::F16),
        proto::DType::DtypeBf16 => (wire, DType::BF16),
        proto::DType::DtypeF32 | proto::DType::DtypeUnspecified => {
            (proto::DType::DtypeF32, DType::F32)
        }
    }
}

/// Little-endian bytes of a flat host buffer (a straight copy on little-endian machines).
fn le_bytes<T: bytemuck::Pod, const N: usize>(values: &[T], to_le: fn(T) -> [u8; N]) -> Vec<u8> {
    if cfg!(target_endian = "little") {
        bytemuck::cast_slice(values).to_vec()
    } else {
        values.iter().flat_map(|&x| to_le(x)).collect()
    }
}

/// Copies a flat tensor already in `dtype` to the host and returns its little-endian bytes.
fn host_bytes(flat: &Tensor, dtype: DType) -> Result<Vec<u8>, TensorError> {
    let err = |e: candle_core::Error| TensorError::Candle(e.to_string());
    Ok(match dtype {
        DType::F16 => le_bytes(
            &flat.to_vec1::<half::f16>().map_err(err)?,
            half::f16::to_le_bytes,
        ),
        DType::BF16 => le_bytes(
            &flat.to_vec1::<half::bf16>().map_err(err)?,
            half::bf16::to_le_bytes,
        ),
        _ => le_bytes(&flat.to_vec1::<f32>().map_err(err)?, f32::to_le_bytes),
    })
}

fn wire_tensor(dims: &[usize], wire: proto::DType, data: Vec<u8>) -> proto::Tensor {
    proto::Tensor {
        dtype: wire as i32,
        shape: dims.iter().map(|&d| d as i64).collect(),
        data,
    }
}

/// Encodes a candle tensor (any float dtype, any device) as a wire tensor in `wire` dtype
/// (`Unspecified` means F32).
pub fn encode(t: &Tensor, wire: proto::DType) -> Result<proto::Tensor, TensorError> {
    let mut out = encode_all(&[t], wire)?;
    Ok(out.remove(0))
}

/// Encodes several tensors of one device in `wire` dtype with a single device-to-host transfer:
/// each is converted and flattened on its device, a GPU concatenates them into one buffer, and
/// the host splits the bytes (one synchronisation per callback however many tensors it carries).
pub fn encode_all(
    tensors: &[&Tensor],
    wire: proto::DType,
) -> Result<Vec<proto::Tensor>, TensorError> {
    let err = |e: candle_core::Error| TensorError::Candle(e.to_string());
    let (wire, dtype) = staging_dtype(wire);
    let flat: Vec<Tensor> = tensors
        .iter()
        .map(|t| t.to_dtype(dtype).and_then(|x| x.flatten_all()))
        .collect::<Result<_, _>>()
        .map_err(err)?;
    let on_cpu = tensors.iter().all(|t| t.device().is_cpu());
    if on_cpu || flat.len() < 2 {
        return flat
            .iter()
            .zip(tensors)
            .map(|(f, t)| Ok(wire_tensor(t.dims(), wire, host_bytes(f, dtype)?)))
            .collect();
    }
    encode_joined(tensors, &flat, wire, dtype)
}

/// The one-transfer path of [`encode_all`]: concatenate the flattened tensors, copy once, split.
fn encode_joined(
    tensors: &[&Tensor],
    flat: &[Tensor],
    wire: proto::DType,
    dtype: DType,
) -> Result<Vec<proto::Tensor>, TensorError> {
    let err = |e: candle_core::Error| TensorError::Candle(e.to_string());
    let joined = host_bytes(&Tensor::cat(flat, 0).map_err(err)?, dtype)?;
    let size = dtype.size_in_bytes();
    let mut offset = 0;
    Ok(tensors
        .iter()
        .map(|t| {
            let len = t.elem_count() * size;
            let data = joined[offset..offset + len].to_vec();
            offset += len;
            wire_tensor(t.dims(), wire, data)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire(dtype: proto::DType, shape: Vec<i64>, data: Vec<u8>) -> proto::Tensor {
        proto::Tensor {
            dtype: dtype as i32,
            shape,
            data,
        }
    }

    #[test]
    fn one_joined_transfer_splits_back_into_each_tensor() {
        let a = Tensor::new(&[[1.5f32, -2.0], [0.25, 3.0]], &Device::Cpu).unwrap();
        let b = Tensor::new(&[7.0f32, 8.0, 9.0], &Device::Cpu).unwrap();
        for wire in [
            proto::DType::DtypeF32,
            proto::DType::DtypeF16,
            proto::DType::DtypeBf16,
        ] {
            let (wire, dtype) = staging_dtype(wire);
            let flat: Vec<Tensor> = [&a, &b]
                .iter()
                .map(|t| t.to_dtype(dtype).unwrap().flatten_all().unwrap())
                .collect();
            let joined = encode_joined(&[&a, &b], &flat, wire, dtype).unwrap();
            let single = vec![encode(&a, wire).unwrap(), encode(&b, wire).unwrap()];
            assert_eq!(joined, single, "{wire:?}");
        }
    }

    #[test]
    fn f32_round_trip_is_exact() {
        let t = Tensor::new(&[[1.5f32, -2.0], [0.25, 3.0]], &Device::Cpu).unwrap();
        let w = encode(&t, proto::DType::DtypeF32).unwrap();
        assert_eq!(w.shape, vec![2, 2]);
        let back = decode(&w, 1 << 20).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), t.to_vec2::<f32>().unwrap());
    }

    #[test]
    fn f16_and_bf16_round_trip_representable_values() {
        let t = Tensor::new(&[1.5f32, -2.0, 0.25], &Device::Cpu).unwrap();
        for d in [proto::DType::DtypeF16, proto::DType::DtypeBf16] {
            let w = encode(&t, d).unwrap();
            assert_eq!(w.data.len(), 6);
            let back = decode(&w, 1 << 20).unwrap();
            assert_eq!(back.to_vec1::<f32>().unwrap(), vec![1.5, -2.0, 0.25]);
        }
    }

    #[test]
    fn unset_dtype_is_refused() {
        let w = wire(proto::DType::DtypeUnspecified, vec![1], vec![0; 4]);
        assert_eq!(decode(&w, 100).unwrap_err(), TensorError::DType(0));
        let mut w = wire(proto::DType::DtypeF32, vec![1], vec![0; 4]);
        w.dtype = 99;
        assert_eq!(decode(&w, 100).unwrap_err(), TensorError::DType(99));
    }

    #[test]
    fn bad_shapes_are_refused() {
        for shape in [vec![], vec![0], vec![2, -1], vec![1; 9]] {
            let w = wire(proto::DType::DtypeF32, shape, vec![]);
            assert!(matches!(
                decode(&w, 100).unwrap_err(),
                TensorError::Shape { .. }
            ));
        }
    }

    #[test]
    fn byte_length_must_match_exactly() {
        let w = wire(proto::DType::DtypeF32, vec![2, 2], vec![0; 15]);
        assert_eq!(
            decode(&w, 100).unwrap_err(),
            TensorError::ByteLength {
                shape: vec![2, 2],
                dtype: "f32",
                expected: 16,
                got: 15
            }
        );
    }

    #[test]
    fn absurd_sizes_fail_before_allocating() {
        let w = wire(proto::DType::DtypeF32, vec![i64::MAX, i64::MAX, 4], vec![]);
        assert!(matches!(
            decode(&w, 1 << 30).unwrap_err(),
            TensorError::TooLarge { .. }
        ));
    }

    #[test]
    fn non_finite_values_are_refused() {
        let mut data = Vec::new();
        for v in [1.0f32, f32::NAN] {
            data.extend_from_slice(&v.to_le_bytes());
        }
        let w = wire(proto::DType::DtypeF32, vec![2], data);
        assert_eq!(decode(&w, 100).unwrap_err(), TensorError::NonFinite(1));
    }
}
