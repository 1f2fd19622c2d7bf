//! The network's parameter counts per module equal MONAI's `vista3d132` (../shared/reference/measurements.md,
//! measured with monai 1.6.1): the architecture has exactly MONAI's tensors.

use tch::{nn, Device};
use vista3d::model::parameter_counts;
use vista3d::{Vista3d, Vista3dConfig};

#[test]
fn width48_parameter_counts_equal_monai() {
    let vs = nn::VarStore::new(Device::Cpu);
    Vista3d::new(&vs.root(), Vista3dConfig::with_width(48)).unwrap();
    let counts = parameter_counts(&vs);
    let get = |m: &str| {
        counts
            .iter()
            .find(|c| c.module == m)
            .unwrap_or_else(|| panic!("{m} missing"))
            .parameters
    };
    let expected = [
        ("total", 217_964_982),
        ("image_encoder", 217_263_024),
        ("image_encoder.encoder", 174_951_120),
        ("image_encoder.up_layers", 21_155_952),
        ("image_encoder.up_layers_auto", 21_155_952),
        ("class_head", 278_112),
        ("class_head.image_post_mapping", 248_832),
        ("class_head.class_embeddings", 24_576),
        ("class_head.mlp", 4_704),
        ("point_head", 423_846),
        ("point_head.transformer", 142_744),
        ("point_head.feat_downsample", 124_512),
        ("point_head.output_upscaling", 124_512),
        ("point_head.class_embeddings", 24_576),
        ("point_head.output_hypernetworks_mlps", 7_056),
        ("point_head.mask_downsample", 110),
    ];
    for (module, n) in expected {
        assert_eq!(get(module), n, "{module}");
    }
    let total = counts.iter().find(|c| c.module == "total").unwrap();
    assert_eq!(
        total.buffer_elements, 72,
        "the positional-encoding buffer is 3 x 24"
    );
    assert_eq!(
        vs.variables().len(),
        259,
        "MONAI's state dict has 259 tensors"
    );
}
