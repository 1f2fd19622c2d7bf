//! `torch.utils.data.DistributedSampler` / `monai.data.DistributedSampler` semantics on a list of positions.
//!
//! - `even_divisible = true` (training): the list is padded by repeating it from the start until its length is a
//!   multiple of the world size, so every rank gets `ceil(n / world)` positions and runs the same number of steps.
//! - `even_divisible = false` (validation, evaluation): no padding; ranks get `ceil` or `floor` of `n / world`.
//!
//! Rank `r` takes positions `r, r + world, r + 2 world, ...` of the (shuffled, padded) list, as torch does. The
//! shuffle itself is the caller's (the training loader shuffles with its own seeded generator and the epoch, the
//! same on every rank).

/// The positions of `order` that rank `rank` of `world` takes (see the module documentation).
pub fn shard<T: Clone>(order: &[T], rank: usize, world: usize, even_divisible: bool) -> Vec<T> {
    padded(order, world, even_divisible)
        .into_iter()
        .skip(rank)
        .step_by(world.max(1))
        .collect()
}

/// `order` padded by repetition to a multiple of `world` (when `even_divisible` and not empty).
pub fn padded<T: Clone>(order: &[T], world: usize, even_divisible: bool) -> Vec<T> {
    let world = world.max(1);
    let mut out = order.to_vec();
    if even_divisible && !order.is_empty() {
        let total = order.len().div_ceil(world) * world;
        while out.len() < total {
            let need = total - out.len();
            out.extend_from_slice(&order[..need.min(order.len())]);
        }
    }
    out
}

/// How many positions each rank gets.
pub fn shard_len(n: usize, rank: usize, world: usize, even_divisible: bool) -> usize {
    let world = world.max(1);
    if even_divisible {
        if n == 0 {
            0
        } else {
            n.div_ceil(world)
        }
    } else {
        (rank..n).step_by(world).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn even_training_shards_pad_from_the_start() {
        let order: Vec<usize> = vec![4, 0, 3, 1, 2];
        // torch: indices += indices[:padding]; rank r takes indices[r::world].
        assert_eq!(padded(&order, 2, true), vec![4, 0, 3, 1, 2, 4]);
        assert_eq!(shard(&order, 0, 2, true), vec![4, 3, 2]);
        assert_eq!(shard(&order, 1, 2, true), vec![0, 1, 4]);
        // More ranks than items: the list repeats as often as needed.
        assert_eq!(padded(&[7, 8], 5, true), vec![7, 8, 7, 8, 7]);
        assert_eq!(shard(&[7, 8], 4, 5, true), vec![7]);
        for n in 0..9 {
            let order: Vec<usize> = (0..n).collect();
            for world in 1..5 {
                let lens: Vec<usize> = (0..world)
                    .map(|r| shard(&order, r, world, true).len())
                    .collect();
                assert!(
                    lens.iter().all(|&l| l == lens[0]),
                    "n {n} world {world}: {lens:?}"
                );
                for (r, &len) in lens.iter().enumerate() {
                    assert_eq!(len, shard_len(n, r, world, true));
                }
            }
        }
    }

    #[test]
    fn uneven_validation_shards_cover_every_item_once() {
        let order: Vec<usize> = (0..5).collect();
        assert_eq!(shard(&order, 0, 2, false), vec![0, 2, 4]);
        assert_eq!(shard(&order, 1, 2, false), vec![1, 3]);
        assert_eq!(shard(&order, 3, 4, false), vec![3]);
        assert_eq!(shard(&[0usize], 1, 2, false), Vec::<usize>::new());
        for n in 0..9 {
            let order: Vec<usize> = (0..n).collect();
            for world in 1..5 {
                let mut all: Vec<usize> = (0..world)
                    .flat_map(|r| shard(&order, r, world, false))
                    .collect();
                for r in 0..world {
                    assert_eq!(
                        shard(&order, r, world, false).len(),
                        shard_len(n, r, world, false)
                    );
                }
                all.sort_unstable();
                assert_eq!(all, order);
            }
        }
        // One rank: the list itself.
        assert_eq!(shard(&order, 0, 1, true), order);
    }
}
