//! Step previews: a batch item's latents (x_t) or the sampler's x0 estimate as a small image,
//! without the VAE. Two decoders: the per-family linear map from the 4 latent channels to RGB
//! (one 4×3 product per latent pixel), and TAESD (`AutoencoderTiny`), when the server has one.

use candle_core::{DType, Tensor};

use super::PipelineError;
use crate::models::pipeline_model::Family;
use crate::models::taesd::TinyDecoder;

/// What a preview shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// The latents after the step.
    Latents,
    /// The sampler's estimate of the clean sample at the step.
    X0,
}

/// How latents become pixels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decoder {
    /// The per-family linear approximation (latent resolution).
    Linear,
    /// TAESD / TAESDXL (the VAE's resolution).
    Tiny,
}

/// The image format of previews.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Lossless, `image/png`.
    Png,
    /// `image/jpeg` at this quality (1..=100).
    Jpeg(u8),
}

/// A validated preview subscription.
#[derive(Clone, Debug, PartialEq)]
pub struct PreviewSpec {
    /// x_t or x0.
    pub source: Source,
    /// The batch items to preview (sorted, unique); empty: all.
    pub items: Vec<usize>,
    /// The largest side at most (0: the decoder's own size).
    pub max_side: u32,
    /// PNG or JPEG.
    pub format: Format,
    /// Every N-th step (`step_index % every == 0`; 0 and 1: every step).
    pub every: u32,
    /// Linear or TAESD.
    pub decoder: Decoder,
}

impl PreviewSpec {
    /// Whether step `i`'s event carries previews.
    pub fn at(&self, i: usize) -> bool {
        self.every <= 1 || i % self.every as usize == 0
    }
}

/// One batch item's preview before encoding: `(item, RGB bytes row by row, width, height)`.
pub type Rgb = (usize, Vec<u8>, u32, u32);

/// One encoded preview of one batch item.
#[derive(Clone, Debug)]
pub struct Preview {
    /// The batch item (0-based).
    pub item: usize,
    /// The encoded image.
    pub data: Vec<u8>,
    /// `image/png` or `image/jpeg`.
    pub mime_type: &'static str,
    /// Its width in pixels.
    pub width: u32,
    /// Its height in pixels.
    pub height: u32,
}

/// The latent→RGB factors, `[channel][r, g, b]`, and the bias, of a family's VAE latents (as
/// the loop holds them, scaled by the VAE's scaling factor). They are the least-squares fits
/// ComfyUI publishes in `comfy/latent_formats.py` (`SD15`, used for SD 1.x and 2.x, which share
/// the VAE; `SDXL`, with its bias). A pixel is `((latent · F + bias) + 1) / 2` in [0, 1], as a
/// byte rounded half up and clamped.
fn linear_factors(family: Family) -> ([[f32; 3]; 4], [f32; 3]) {
    match family {
        Family::Sdxl => (
            [
                [0.3651, 0.4232, 0.4341],
                [-0.2533, -0.0042, 0.1068],
                [0.1076, 0.1111, -0.0362],
                [-0.3165, -0.2492, -0.2188],
            ],
            [0.1084, -0.0175, -0.0011],
        ),
        Family::Sd1 | Family::Sd2 => (
            [
                [0.3512, 0.2297, 0.3227],
                [0.3250, 0.4974, 0.2350],
                [-0.2829, 0.1762, 0.2721],
                [-0.2120, -0.2616, -0.7177],
            ],
            [0.0, 0.0, 0.0],
        ),
    }
}

/// The linear preview of latents `[B, 4, h, w]`: per item, RGB bytes `h × w × 3`.
pub fn linear_rgb(
    family: Family,
    latents: &Tensor,
    items: &[usize],
) -> Result<Vec<Rgb>, PipelineError> {
    let (b, c, h, w) = latents.dims4()?;
    if c != 4 {
        return Err(PipelineError::InvalidRequest {
            field: "callback.preview".into(),
            reason: format!("the linear preview needs 4 latent channels, not {c}"),
        });
    }
    // One transfer of the whole batch: a few hundred kilobytes at SD sizes.
    let all = latents
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let (f, bias) = linear_factors(family);
    // The map from [-1, 1] to bytes folded into the factors: byte = v · 127.5 + 127.5, rounded
    // half up by the + 0.5 before the truncating cast, after a clamp to 0..=255. No libm call
    // per value: this loop is the preview's whole cost.
    let f: [[f32; 3]; 4] = f.map(|row| row.map(|v| v * 127.5));
    let bias = bias.map(|b| b * 127.5 + 127.5 + 0.5);
    let plane = h * w;
    let mut out = Vec::new();
    for item in chosen(items, b) {
        let x = &all[item * c * plane..(item + 1) * c * plane];
        let (l0, rest) = x.split_at(plane);
        let (l1, rest) = rest.split_at(plane);
        let (l2, l3) = rest.split_at(plane);
        // Planar first (one straight loop per colour, which the compiler vectorizes), then
        // interleaved into RGB.
        let mut planes = [vec![0u8; plane], vec![0u8; plane], vec![0u8; plane]];
        for (k, out) in planes.iter_mut().enumerate() {
            let [f0, f1, f2, f3] = [f[0][k], f[1][k], f[2][k], f[3][k]];
            for ((((o, &a), &b), &c), &d) in out.iter_mut().zip(l0).zip(l1).zip(l2).zip(l3) {
                *o = (a * f0 + b * f1 + c * f2 + d * f3 + bias[k]).clamp(0.0, 255.0) as u8;
            }
        }
        let mut rgb = vec![0u8; plane * 3];
        for (((px, &r), &g), &b) in rgb
            .chunks_exact_mut(3)
            .zip(&planes[0])
            .zip(&planes[1])
            .zip(&planes[2])
        {
            px.copy_from_slice(&[r, g, b]);
        }
        out.push((item, rgb, w as u32, h as u32));
    }
    Ok(out)
}

/// The TAESD preview of latents `[B, 4, h, w]`: per item, RGB bytes at the decoder's size.
pub fn tiny_rgb(
    decoder: &TinyDecoder,
    latents: &Tensor,
    items: &[usize],
) -> Result<Vec<Rgb>, PipelineError> {
    let b = latents.dim(0)?;
    let picked = chosen(items, b);
    let index = Tensor::new(
        picked.iter().map(|&i| i as u32).collect::<Vec<_>>(),
        latents.device(),
    )?;
    let x = if picked.len() == b {
        latents.clone()
    } else {
        latents.index_select(&index, 0)?
    };
    let image = decoder.decode_unit(&x)?;
    let (_, _, h, w) = image.dims4()?;
    let hwc = (image.permute((0, 2, 3, 1))? * 255.0)?.contiguous()?;
    let mut out = Vec::with_capacity(picked.len());
    for (k, item) in picked.into_iter().enumerate() {
        let vals = hwc.get(k)?.flatten_all()?.to_vec1::<f32>()?;
        let rgb = vals.iter().map(|v| v.round() as u8).collect();
        out.push((item, rgb, w as u32, h as u32));
    }
    Ok(out)
}

/// The items to preview: `items` (already checked against the batch), or all.
fn chosen(items: &[usize], batch: usize) -> Vec<usize> {
    if items.is_empty() {
        (0..batch).collect()
    } else {
        items.iter().copied().filter(|&i| i < batch).collect()
    }
}

/// Scales an RGB image down so that its largest side is at most `max_side` (0: as it is), then
/// encodes it.
pub fn encode(
    item: usize,
    rgb: Vec<u8>,
    width: u32,
    height: u32,
    max_side: u32,
    format: Format,
) -> Result<Preview, PipelineError> {
    let img = image::RgbImage::from_raw(width, height, rgb)
        .ok_or_else(|| PipelineError::Image("preview buffer of the wrong size".into()))?;
    let img = if max_side > 0 && width.max(height) > max_side {
        let scale = max_side as f64 / width.max(height) as f64;
        let (w, h) = (
            ((width as f64 * scale).round() as u32).max(1),
            ((height as f64 * scale).round() as u32).max(1),
        );
        image::imageops::resize(&img, w, h, image::imageops::FilterType::Triangle)
    } else {
        img
    };
    let (w, h) = img.dimensions();
    let mut data = Vec::new();
    let mime_type = match format {
        Format::Png => {
            // Fast compression: a preview is sent once and thrown away.
            let enc = image::codecs::png::PngEncoder::new_with_quality(
                &mut data,
                image::codecs::png::CompressionType::Fast,
                image::codecs::png::FilterType::NoFilter,
            );
            image::ImageEncoder::write_image(
                enc,
                img.as_raw(),
                w,
                h,
                image::ExtendedColorType::Rgb8,
            )
            .map_err(|e| PipelineError::Image(e.to_string()))?;
            "image/png"
        }
        Format::Jpeg(quality) => {
            let enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut data, quality);
            image::ImageEncoder::write_image(
                enc,
                img.as_raw(),
                w,
                h,
                image::ExtendedColorType::Rgb8,
            )
            .map_err(|e| PipelineError::Image(e.to_string()))?;
            "image/jpeg"
        }
    };
    Ok(Preview {
        item,
        data,
        mime_type,
        width: w,
        height: h,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn the_linear_preview_is_the_published_map_per_pixel() {
        // One latent pixel per channel value: channel k is 1, the others 0, so each pixel's RGB
        // is row k of the factors (plus the bias), mapped from [-1, 1] to bytes.
        let mut v = vec![0f32; 4 * 4];
        for k in 0..4 {
            v[k * 4 + k] = 1.0;
        }
        let t = Tensor::from_vec(v, (1, 4, 2, 2), &Device::Cpu).unwrap();
        for family in [Family::Sd1, Family::Sdxl] {
            let (f, bias) = linear_factors(family);
            let out = linear_rgb(family, &t, &[]).unwrap();
            let (item, rgb, w, h) = &out[0];
            assert_eq!((*item, *w, *h), (0, 2, 2));
            for p in 0..4 {
                for k in 0..3 {
                    let want =
                        (((f[p][k] + bias[k] + 1.0) * 0.5).clamp(0.0, 1.0) * 255.0).round() as u8;
                    assert_eq!(rgb[3 * p + k], want, "{family:?} pixel {p} channel {k}");
                }
            }
        }
    }

    #[test]
    fn previews_shrink_to_the_largest_side_and_encode() {
        let rgb = vec![128u8; 64 * 32 * 3];
        let png = encode(1, rgb.clone(), 64, 32, 16, Format::Png).unwrap();
        assert_eq!(
            (png.item, png.width, png.height, png.mime_type),
            (1, 16, 8, "image/png")
        );
        let back = image::load_from_memory(&png.data).unwrap().to_rgb8();
        assert_eq!(back.dimensions(), (16, 8));
        let jpeg = encode(0, rgb, 64, 32, 0, Format::Jpeg(80)).unwrap();
        assert_eq!(
            (jpeg.width, jpeg.height, jpeg.mime_type),
            (64, 32, "image/jpeg")
        );
        assert_eq!(&jpeg.data[..2], &[0xFF, 0xD8]);
    }
}
