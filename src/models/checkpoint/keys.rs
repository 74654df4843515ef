//! Diffusers weight names → original (LDM) checkpoint keys. The networks ask for diffusers
//! names; these functions say where each lives in an LDM file (the inverse of diffusers'
//! `convert_ldm_*_checkpoint`). `None` means the name has no LDM counterpart.

/// How a diffusers weight is taken from its checkpoint tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Take {
    /// As stored (up to unit dimensions).
    Whole,
    /// Rows `i/3..(i+1)/3` of a fused q/k/v `in_proj` (OpenCLIP).
    Third(usize),
    /// Transposed: OpenCLIP's `text_projection` is `[hidden, proj]`, a Linear's weight the reverse.
    Transposed,
}

/// Splits `a.b.rest` into `(a, b, rest)`.
fn split3(name: &str) -> Option<(&str, &str, &str)> {
    let (a, r) = name.split_once('.')?;
    let (b, r) = r.split_once('.')?;
    Some((a, b, r))
}

/// A ResNet block's sub-module names: diffusers → LDM.
fn unet_resnet(rest: &str) -> Option<String> {
    let (head, tail) = rest.split_once('.')?;
    let ldm = match head {
        "norm1" => "in_layers.0",
        "conv1" => "in_layers.2",
        "norm2" => "out_layers.0",
        "conv2" => "out_layers.3",
        "time_emb_proj" => "emb_layers.1",
        "conv_shortcut" => "skip_connection",
        _ => return None,
    };
    Some(format!("{ldm}.{tail}"))
}

/// A UNet weight. LDM numbers the down path as `input_blocks` (conv_in, then per level
/// `layers_per_block` resnet+attention pairs and a downsampler) and the up path as
/// `output_blocks` (`layers_per_block + 1` per level, the upsampler inside the last one, after
/// its attention when it has one: `has` tells, by the keys present).
pub(super) fn unet(
    name: &str,
    layers_per_block: usize,
    has: &dyn Fn(&str) -> bool,
) -> Option<String> {
    const TOP: &[(&str, &str)] = &[
        ("time_embedding.linear_1.", "time_embed.0."),
        ("time_embedding.linear_2.", "time_embed.2."),
        ("add_embedding.linear_1.", "label_emb.0.0."),
        ("add_embedding.linear_2.", "label_emb.0.2."),
        ("conv_in.", "input_blocks.0.0."),
        ("conv_norm_out.", "out.0."),
        ("conv_out.", "out.2."),
    ];
    for (hf, ldm) in TOP {
        if let Some(rest) = name.strip_prefix(hf) {
            return Some(format!("{ldm}{rest}"));
        }
    }
    let per_level = layers_per_block + 1;
    let (path, level, rest) = split3(name)?;
    if path == "mid_block" {
        // `mid_block.{resnets|attentions}.{j}.rest`: here `level` is the kind.
        let (j, rest) = rest.split_once('.')?;
        let j: usize = j.parse().ok()?;
        return match level {
            "resnets" => Some(format!("middle_block.{}.{}", 2 * j, unet_resnet(rest)?)),
            "attentions" if j == 0 => Some(format!("middle_block.1.{rest}")),
            _ => None,
        };
    }
    let level: usize = level.parse().ok()?;
    let (kind, j, rest) = split3(rest)?;
    let j: usize = j.parse().ok()?;
    match (path, kind) {
        ("down_blocks", "resnets") => Some(format!(
            "input_blocks.{}.0.{}",
            1 + level * per_level + j,
            unet_resnet(rest)?
        )),
        ("down_blocks", "attentions") => Some(format!(
            "input_blocks.{}.1.{rest}",
            1 + level * per_level + j
        )),
        ("down_blocks", "downsamplers") if j == 0 => {
            let rest = rest.strip_prefix("conv.")?;
            Some(format!(
                "input_blocks.{}.0.op.{rest}",
                (level + 1) * per_level
            ))
        }
        ("up_blocks", "resnets") => Some(format!(
            "output_blocks.{}.0.{}",
            level * per_level + j,
            unet_resnet(rest)?
        )),
        ("up_blocks", "attentions") => {
            Some(format!("output_blocks.{}.1.{rest}", level * per_level + j))
        }
        ("up_blocks", "upsamplers") if j == 0 => {
            let rest = rest.strip_prefix("conv.")?;
            let block = level * per_level + layers_per_block;
            let after_resnet = format!("output_blocks.{block}.1.conv.{rest}");
            if has(&after_resnet) {
                Some(after_resnet)
            } else {
                Some(format!("output_blocks.{block}.2.conv.{rest}"))
            }
        }
        _ => None,
    }
}

/// A VAE ResNet's names: only the shortcut differs.
fn vae_resnet(rest: &str) -> String {
    match rest.strip_prefix("conv_shortcut.") {
        Some(tail) => format!("nin_shortcut.{tail}"),
        None => rest.to_string(),
    }
}

/// A VAE weight. The LDM decoder numbers its levels from the bottom (`up.{levels-1}` is
/// diffusers' `up_blocks.0`); the mid attention's q/k/v/out are 1×1 convolutions there.
pub(super) fn vae(name: &str, levels: usize) -> Option<String> {
    let (side, rest) = name.split_once('.')?;
    if side == "quant_conv" || side == "post_quant_conv" {
        return Some(name.to_string());
    }
    if side != "encoder" && side != "decoder" {
        return None;
    }
    if let Some(tail) = rest.strip_prefix("conv_norm_out.") {
        return Some(format!("{side}.norm_out.{tail}"));
    }
    if rest.starts_with("conv_in.") || rest.starts_with("conv_out.") {
        return Some(name.to_string());
    }
    let (path, a, rest) = split3(rest)?;
    if path == "mid_block" {
        let (j, tail) = rest.split_once('.')?;
        let j: usize = j.parse().ok()?;
        return match a {
            "resnets" => Some(format!("{side}.mid.block_{}.{}", j + 1, vae_resnet(tail))),
            "attentions" if j == 0 => {
                let (head, w) = tail.split_once('.')?;
                let (ldm, w) = match head {
                    "group_norm" => ("norm", w),
                    "to_q" => ("q", w),
                    "to_k" => ("k", w),
                    "to_v" => ("v", w),
                    "to_out" => ("proj_out", w.strip_prefix("0.")?),
                    _ => return None,
                };
                Some(format!("{side}.mid.attn_1.{ldm}.{w}"))
            }
            _ => None,
        };
    }
    let level: usize = a.parse().ok()?;
    let (kind, j, tail) = split3(rest)?;
    let j: usize = j.parse().ok()?;
    match (side, path, kind) {
        ("encoder", "down_blocks", "resnets") => Some(format!(
            "encoder.down.{level}.block.{j}.{}",
            vae_resnet(tail)
        )),
        ("encoder", "down_blocks", "downsamplers") if j == 0 => {
            Some(format!("encoder.down.{level}.downsample.{tail}"))
        }
        ("decoder", "up_blocks", "resnets") if level < levels => Some(format!(
            "decoder.up.{}.block.{j}.{}",
            levels - 1 - level,
            vae_resnet(tail)
        )),
        ("decoder", "up_blocks", "upsamplers") if j == 0 && level < levels => {
            Some(format!("decoder.up.{}.upsample.{tail}", levels - 1 - level))
        }
        _ => None,
    }
}

/// A transformers CLIP text model stored whole under `prefix` (SD 1.x, SDXL's first encoder):
/// published files carry `text_model.`; some older ones do not, so both are looked for.
pub(super) fn clip(name: &str, prefix: &str, has: &dyn Fn(&str) -> bool) -> Option<(String, Take)> {
    let bare = name.strip_prefix("text_model.").unwrap_or(name);
    if bare.starts_with("text_projection") {
        return None;
    }
    let prefixed = format!("{prefix}text_model.{bare}");
    if has(&prefixed) {
        Some((prefixed, Take::Whole))
    } else {
        Some((format!("{prefix}{bare}"), Take::Whole))
    }
}

/// An OpenCLIP text tower under `prefix` (SD 2.x; SDXL's second encoder, which alone keeps its
/// `text_projection`: SD 2.x's pipeline never uses it, and diffusers loads it as a plain
/// `CLIPTextModel`).
pub(super) fn open_clip(name: &str, prefix: &str, with_projection: bool) -> Option<(String, Take)> {
    let bare = name.strip_prefix("text_model.").unwrap_or(name);
    let whole = |k: String| Some((format!("{prefix}{k}"), Take::Whole));
    match bare {
        "embeddings.token_embedding.weight" => return whole("token_embedding.weight".into()),
        "embeddings.position_embedding.weight" => return whole("positional_embedding".into()),
        "text_projection.weight" if with_projection => {
            return Some((format!("{prefix}text_projection"), Take::Transposed))
        }
        _ => {}
    }
    if let Some(tail) = bare.strip_prefix("final_layer_norm.") {
        return whole(format!("ln_final.{tail}"));
    }
    let rest = bare.strip_prefix("encoder.layers.")?;
    let (i, rest) = rest.split_once('.')?;
    let i: usize = i.parse().ok()?;
    let block = format!("transformer.resblocks.{i}");
    let (module, param) = rest.rsplit_once('.')?;
    let third = |q: usize| {
        Some((
            format!("{prefix}{block}.attn.in_proj_{param}"),
            Take::Third(q),
        ))
    };
    match module {
        "self_attn.q_proj" => third(0),
        "self_attn.k_proj" => third(1),
        "self_attn.v_proj" => third(2),
        "self_attn.out_proj" => whole(format!("{block}.attn.out_proj.{param}")),
        "layer_norm1" => whole(format!("{block}.ln_1.{param}")),
        "layer_norm2" => whole(format!("{block}.ln_2.{param}")),
        "mlp.fc1" => whole(format!("{block}.mlp.c_fc.{param}")),
        "mlp.fc2" => whole(format!("{block}.mlp.c_proj.{param}")),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unet_names_follow_the_ldm_block_numbering() {
        let none = |_: &str| false;
        let cases = [
            ("conv_in.weight", "input_blocks.0.0.weight"),
            ("time_embedding.linear_2.bias", "time_embed.2.bias"),
            ("add_embedding.linear_1.weight", "label_emb.0.0.weight"),
            (
                "down_blocks.0.resnets.1.norm1.weight",
                "input_blocks.2.0.in_layers.0.weight",
            ),
            (
                "down_blocks.1.attentions.0.proj_in.weight",
                "input_blocks.4.1.proj_in.weight",
            ),
            (
                "down_blocks.2.downsamplers.0.conv.bias",
                "input_blocks.9.0.op.bias",
            ),
            (
                "down_blocks.1.resnets.0.conv_shortcut.weight",
                "input_blocks.4.0.skip_connection.weight",
            ),
            (
                "mid_block.resnets.1.time_emb_proj.weight",
                "middle_block.2.emb_layers.1.weight",
            ),
            (
                "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight",
                "middle_block.1.transformer_blocks.0.attn2.to_k.weight",
            ),
            (
                "up_blocks.3.resnets.2.conv2.weight",
                "output_blocks.11.0.out_layers.3.weight",
            ),
            (
                "up_blocks.1.attentions.2.norm.bias",
                "output_blocks.5.1.norm.bias",
            ),
            (
                "up_blocks.1.upsamplers.0.conv.weight",
                "output_blocks.5.2.conv.weight",
            ),
            ("conv_out.weight", "out.2.weight"),
        ];
        for (hf, ldm) in cases {
            assert_eq!(unet(hf, 2, &none).as_deref(), Some(ldm), "{hf}");
        }
        // An up level without attention keeps its upsampler right after the resnet.
        let plain = |k: &str| k == "output_blocks.2.1.conv.weight";
        assert_eq!(
            unet("up_blocks.0.upsamplers.0.conv.weight", 2, &plain).as_deref(),
            Some("output_blocks.2.1.conv.weight")
        );
        assert_eq!(unet("down_blocks.0.nonsense.0.x", 2, &none), None);
    }

    #[test]
    fn vae_decoder_levels_count_from_the_bottom() {
        let cases = [
            ("decoder.conv_norm_out.weight", "decoder.norm_out.weight"),
            (
                "decoder.up_blocks.0.resnets.2.conv1.weight",
                "decoder.up.3.block.2.conv1.weight",
            ),
            (
                "decoder.up_blocks.3.resnets.0.conv_shortcut.bias",
                "decoder.up.0.block.0.nin_shortcut.bias",
            ),
            (
                "decoder.up_blocks.1.upsamplers.0.conv.weight",
                "decoder.up.2.upsample.conv.weight",
            ),
            (
                "decoder.mid_block.attentions.0.to_out.0.weight",
                "decoder.mid.attn_1.proj_out.weight",
            ),
            (
                "decoder.mid_block.attentions.0.group_norm.bias",
                "decoder.mid.attn_1.norm.bias",
            ),
            (
                "encoder.mid_block.resnets.1.norm2.weight",
                "encoder.mid.block_2.norm2.weight",
            ),
            (
                "encoder.down_blocks.2.downsamplers.0.conv.weight",
                "encoder.down.2.downsample.conv.weight",
            ),
            ("post_quant_conv.bias", "post_quant_conv.bias"),
        ];
        for (hf, ldm) in cases {
            assert_eq!(vae(hf, 4).as_deref(), Some(ldm), "{hf}");
        }
    }

    #[test]
    fn open_clip_splits_the_fused_attention_and_transposes_the_projection() {
        let p = "cond_stage_model.model.";
        let get = |n: &str, proj| open_clip(n, p, proj);
        assert_eq!(
            get("text_model.encoder.layers.3.self_attn.k_proj.weight", false),
            Some((
                format!("{p}transformer.resblocks.3.attn.in_proj_weight"),
                Take::Third(1)
            ))
        );
        assert_eq!(
            get("encoder.layers.0.mlp.fc2.bias", false),
            Some((
                format!("{p}transformer.resblocks.0.mlp.c_proj.bias"),
                Take::Whole
            ))
        );
        assert_eq!(
            get("embeddings.position_embedding.weight", false),
            Some((format!("{p}positional_embedding"), Take::Whole))
        );
        assert_eq!(get("text_projection.weight", false), None);
        assert_eq!(
            get("text_projection.weight", true),
            Some((format!("{p}text_projection"), Take::Transposed))
        );
    }
}
