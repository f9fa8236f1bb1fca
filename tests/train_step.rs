//! Execution options of a train step: --memory-format changes the layout and not the result, and
//! `auto` picks channels-last only where every feature map is 4 px or more.

mod common;

use csp_tch::config::MemoryFormat;
use csp_tch::train::Trainer;
use tch::Device;

/// The losses of three train steps of cspdarknet53-pad0 on fixed data, in `memory_format`.
fn losses(memory_format: MemoryFormat) -> (Vec<f64>, Trainer) {
    let _rng = common::rng_turn();
    let recipe = common::tiny_recipe(2);
    let execution = common::execution(false, memory_format);
    let mut trainer = Trainer::new("cspdarknet53-pad0", 10, &recipe, &execution, Device::Cpu).unwrap();
    (common::train_on_one_batch(&mut trainer, &recipe, 3, 9), trainer)
}

#[test]
fn channels_last_changes_the_layout_not_the_result() {
    let (plain, _) = losses(MemoryFormat::Contiguous);
    let (nhwc, trainer) = losses(MemoryFormat::ChannelsLast);
    let weight = &trainer.vs.variables()["stage.2.3.1.conv.weight"];
    let [_, c, h, w] = weight.size()[..] else { panic!() };
    assert_eq!(weight.stride(), vec![h * w * c, 1, w * c, c], "NHWC strides");
    // The same network on the same batch: the first loss agrees to rounding. (Later ones drift
    // apart, as any two convolution algorithms do once Adam amplifies sign flips of tiny gradients.)
    assert!((plain[0] - nhwc[0]).abs() <= 1e-4 * plain[0], "{plain:?} vs {nhwc:?}");
    assert!(nhwc.iter().all(|l| l.is_finite()) && nhwc[2] < nhwc[0], "it trains: {nhwc:?}");
}

#[test]
fn auto_picks_channels_last_where_every_map_is_at_least_4_px() {
    // Building models draws from the global generator that the other tests seed.
    let _rng = common::rng_turn();
    // (model, input size, smallest feature map): 1x1 and 2x2 maps stay NCHW.
    for (model, size, smallest) in [
        ("darknet53", 32, 1),
        ("cspdarknet53-pad0", 32, 1),
        ("cspdarknet53", 32, 5),
        ("darknet53", 64, 2),
        ("darknet53", 128, 4),
        ("darknet53", 224, 7),
        ("cspdarknet53-pad0", 224, 7),
    ] {
        let summary = csp_tch::models::summary(csp_tch::models::model_info(model).unwrap(), 10, size);
        assert_eq!(summary.smallest_map, smallest, "{model} at {size} px");
        let auto = MemoryFormat::Auto.channels_last(|| summary.smallest_map);
        assert_eq!(auto, smallest >= MemoryFormat::CHANNELS_LAST_MIN_MAP, "{model} at {size} px");
        assert!(!MemoryFormat::Contiguous.channels_last(|| summary.smallest_map));
        assert!(MemoryFormat::ChannelsLast.channels_last(|| summary.smallest_map));
    }
    let execution = common::execution(false, MemoryFormat::Auto);
    let trainer = Trainer::new("cspdarknet53", 10, &common::tiny_recipe(2), &execution, Device::Cpu).unwrap();
    assert!(trainer.model.is_channels_last(), "cspdarknet53 at 32 px trains channels-last under auto");
}
