//! Training and finetuning (the bundle's `train.json` / `train_continual.json`).

pub mod loss;
pub mod optim;
pub mod plot;
pub mod sampler;
pub mod schedule;
