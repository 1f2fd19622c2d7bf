//! MONAI's `point_based_window_inferer`: one window centred on every point, outputs summed where windows
//! overlap, NaN where no window ran (written as 255 in the final label map).

use anyhow::{ensure, Result};
use tch::{Device, Kind, Tensor};

use super::WindowNetwork;
use crate::model::ForwardArgs;

/// Window `[start, end)` along one axis for a point at `p` (MONAI `_get_window_idx_c`; `int` truncates).
pub fn window_around(p: f64, roi: usize, size: usize) -> (usize, usize) {
    let half = (roi / 2) as f64;
    if p - half < 0.0 {
        (0, roi)
    } else if p + half > size as f64 {
        (size - roi, size)
    } else {
        let c = p.trunc() as i64;
        ((c - half as i64) as usize, (c + half as i64) as usize)
    }
}

/// Prompts of a point-window run (one object).
pub struct PointWindowPrompts<'a> {
    /// `[1, N, 3]` float64, voxel coordinates of `image`.
    pub point_coords: &'a Tensor,
    /// `[1, N]` int64.
    pub point_labels: &'a Tensor,
    /// `[1, 1]` class id for the class head, if any.
    pub class_vector: Option<&'a Tensor>,
    /// `[1, 1]` class id telling the point head whether the object is zero-shot.
    pub prompt_class: Option<&'a Tensor>,
    /// `[1, 1, X, Y, Z]` previous logits, used where no window ran.
    pub prev_mask: Option<&'a Tensor>,
}

/// Runs the network on a window around each point of `image` `[1, 1, X, Y, Z]` and stitches the outputs:
/// `[1, 1, X, Y, Z]` float32 on the CPU, NaN where no window ran (unless `prev_mask` fills it).
pub fn point_window_inference(
    net: &dyn WindowNetwork,
    image: &Tensor,
    roi: [usize; 3],
    prompts: &PointWindowPrompts,
) -> Result<Tensor> {
    let pc_size = prompts.point_coords.size();
    ensure!(
        pc_size.len() == 3 && pc_size[0] == 1,
        "point windows take one object: point_coords must be [1, N, 3]"
    );
    let size: Vec<usize> = image.size()[2..].iter().map(|&s| s as usize).collect();
    // Constant (0) padding up to the roi, points shifted by the padding before each axis.
    let pad: [(usize, usize); 3] = std::array::from_fn(|a| {
        let diff = roi[a].saturating_sub(size[a]);
        (diff / 2, diff - diff / 2)
    });
    let padded = pad_constant(image, &pad);
    let psize: [usize; 3] = std::array::from_fn(|a| size[a] + pad[a].0 + pad[a].1);
    let shift = Tensor::from_slice(&pad.map(|p| p.0 as f64)).to_kind(prompts.point_coords.kind());
    let coords = prompts.point_coords.to_device(Device::Cpu) + shift.view([1, 1, 3]);
    let prev = prompts.prev_mask.map(|m| pad_constant(m, &pad));
    let host_points: Vec<f64> = Vec::try_from(coords.to_kind(Kind::Double).flatten(0, -1))?;

    let device = image.device();
    let coords_dev = coords.to_device(device);
    let labels_dev = prompts.point_labels.to_device(device);
    let mut stitched: Option<Tensor> = None;
    let mut mask: Option<Tensor> = None;
    for p in host_points.chunks(3) {
        let w: [(usize, usize); 3] = std::array::from_fn(|a| window_around(p[a], roi[a], psize[a]));
        let mut window = padded.shallow_clone();
        for (a, &(lo, hi)) in w.iter().enumerate() {
            window = window.narrow(2 + a as i64, lo as i64, (hi - lo) as i64);
        }
        let args = ForwardArgs {
            point_coords: Some(&coords_dev),
            point_labels: Some(&labels_dev),
            class_vector: prompts.class_vector,
            prompt_class: prompts.prompt_class,
            patch_coords: Some(w.map(|(lo, hi)| lo as i64..hi as i64)),
            prev_mask: prev.as_ref(),
            radius: None,
            transpose: true,
        };
        let out = tch::no_grad(|| net.forward_window(&window.contiguous(), &args))?
            .to_device(Device::Cpu)
            .to_kind(Kind::Float);
        let b = out.size()[1];
        let full = [1, b, psize[0] as i64, psize[1] as i64, psize[2] as i64];
        let s = stitched.get_or_insert_with(|| Tensor::zeros(full, (Kind::Float, Device::Cpu)));
        let m = mask.get_or_insert_with(|| Tensor::zeros(full, (Kind::Float, Device::Cpu)));
        let mut s_view = s.shallow_clone();
        let mut m_view = m.shallow_clone();
        for (a, &(lo, hi)) in w.iter().enumerate() {
            s_view = s_view.narrow(2 + a as i64, lo as i64, (hi - lo) as i64);
            m_view = m_view.narrow(2 + a as i64, lo as i64, (hi - lo) as i64);
        }
        let _ = s_view.f_add_(&out)?;
        let _ = m_view.f_fill_(1.0)?;
    }
    let (Some(stitched), Some(mask)) = (stitched, mask) else {
        anyhow::bail!("no point was given, so no window was run");
    };
    let mut out = &stitched / &mask;
    let crop = |t: &Tensor| {
        let mut t = t.shallow_clone();
        for (a, &(before, _)) in pad.iter().enumerate() {
            t = t.narrow(2 + a as i64, before as i64, size[a] as i64);
        }
        t
    };
    out = crop(&out);
    if let Some(prev) = &prev {
        let uncovered = crop(&mask).lt(1.0);
        out = crop(&prev.to_device(Device::Cpu).to_kind(Kind::Float)).where_self(&uncovered, &out);
    }
    Ok(out.contiguous())
}

/// Zero padding `(before, after)` of the last three dims.
fn pad_constant(t: &Tensor, pad: &[(usize, usize); 3]) -> Tensor {
    if pad.iter().all(|&(a, b)| a == 0 && b == 0) {
        return t.shallow_clone();
    }
    let p = [pad[2].0, pad[2].1, pad[1].0, pad[1].1, pad[0].0, pad[0].1].map(|v| v as i64);
    t.constant_pad_nd(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_follow_monai_rules() {
        // Near the start: clamp to 0; near the end: clamp to the end; else centred on int(p).
        assert_eq!(window_around(10.0, 64, 200), (0, 64));
        assert_eq!(window_around(190.0, 64, 200), (136, 200));
        assert_eq!(window_around(100.7, 64, 200), (68, 132));
        assert_eq!(window_around(32.0, 64, 200), (0, 64));
        assert_eq!(window_around(168.0, 64, 200), (136, 200));
    }
}
