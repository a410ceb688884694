//! Partitioned streams (`PARTITIONS`): which partition a sample lives in, the names of a
//! stream's partition queues, and which partitions a metric instance owns.
//!
//! A sample with id `id` lives in partition `k = FNV-1a-64(id as UTF-8) mod P`. The producer routes
//! `features` and `y_true` by it and the model routes `y_pred` by it, so both halves of a pair
//! always meet in the same partition. With `P = 1` every name is the stream's own (`features`),
//! exactly as before partitions existed; with `P > 1` the queues are `<queue>.p<k>`.

use std::fmt;
use std::path::{Path, PathBuf};

/// FNV-1a 64-bit offset basis.
pub const FNV_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
/// FNV-1a 64-bit prime.
pub const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
/// The most partitions a stream may have (each is a queue per stream on the broker).
pub const MAX_PARTITIONS: u32 = 1024;
/// Dead-letter reason of a message found in a partition its id does not hash to.
pub const WRONG_PARTITION: &str = "wrong_partition";

/// FNV-1a, 64 bits, of `bytes`.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(FNV_OFFSET_BASIS, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(FNV_PRIME)
    })
}

/// How many partitions each stream has (`PARTITIONS`), always at least 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Partitions(u32);

impl Default for Partitions {
    fn default() -> Self {
        Self::ONE
    }
}

/// A partition count that is 0 or above [`MAX_PARTITIONS`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("PARTITIONS must be between 1 and {MAX_PARTITIONS}, not {0}")]
pub struct InvalidPartitions(pub u32);

impl Partitions {
    /// One partition: today's single queue per stream.
    pub const ONE: Self = Self(1);

    /// `count` partitions.
    pub fn new(count: u32) -> Result<Self, InvalidPartitions> {
        if (1..=MAX_PARTITIONS).contains(&count) {
            Ok(Self(count))
        } else {
            Err(InvalidPartitions(count))
        }
    }

    /// The count.
    pub fn count(self) -> u32 {
        self.0
    }

    /// More than one partition: names and folders carry `p<k>`.
    pub fn is_partitioned(self) -> bool {
        self.0 > 1
    }

    /// The partition of the sample `id`.
    pub fn of(self, id: &str) -> u32 {
        // The remainder is below `self.0`, a u32.
        (fnv1a64(id.as_bytes()) % u64::from(self.0)) as u32
    }

    /// Every partition, `0 .. P`.
    pub fn all(self) -> impl Iterator<Item = u32> {
        0..self.0
    }

    /// The queue of partition `k` of the stream `queue`: `queue` itself with one partition,
    /// `<queue>.p<k>` with more.
    pub fn queue(self, queue: &str, k: u32) -> String {
        if self.is_partitioned() {
            format!("{queue}.p{k}")
        } else {
            queue.to_owned()
        }
    }

    /// The queues of every partition of the stream `queue`, in partition order.
    pub fn queues(self, queue: &str) -> Vec<String> {
        self.all().map(|k| self.queue(queue, k)).collect()
    }

    /// The folder of partition `k` under `dir`: `dir` itself with one partition, `dir/p<k>` with
    /// more.
    pub fn folder(self, dir: &Path, k: u32) -> PathBuf {
        if self.is_partitioned() {
            dir.join(format!("p{k}"))
        } else {
            dir.to_owned()
        }
    }

    /// Whether the sample `id` belongs in partition `k`; a message elsewhere is dead-lettered
    /// with [`WRONG_PARTITION`].
    pub fn holds(self, k: u32, id: &str) -> bool {
        self.of(id) == k
    }
}

impl fmt::Display for Partitions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The partition queues of one stream, looked up by sample id without allocating.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Router {
    partitions: Partitions,
    queues: Vec<String>,
}

impl Router {
    /// The router of the stream `queue`.
    pub fn new(queue: &str, partitions: Partitions) -> Self {
        Self {
            partitions,
            queues: partitions.queues(queue),
        }
    }

    /// The queue of the sample `id`. A message without an id (a course-style peer's, which the
    /// pipeline cannot join anyway) goes to partition 0.
    pub fn queue_for(&self, id: Option<&str>) -> &str {
        let k = id.map_or(0, |id| self.partitions.of(id));
        // `of` is below the count, which is the number of queues.
        &self.queues[k as usize]
    }

    /// Every partition queue, in partition order.
    pub fn queues(&self) -> &[String] {
        &self.queues
    }

    /// The partition count.
    pub fn partitions(&self) -> Partitions {
        self.partitions
    }
}

/// The queue that records a stream's partition count on the broker: declared with
/// `x-max-length = P` by every service of a partitioned pipeline, so a service started with
/// another `P` gets PRECONDITION_FAILED at start-up (see [`crate::broker::retry::classify`]).
/// Nothing is ever published to it.
pub fn marker_queue(queue: &str) -> String {
    format!("{queue}.partitions")
}

/// Which partitions one metric instance owns: `k` with `k mod instances == instance`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ownership {
    instances: u32,
    instance: u32,
}

/// An instance number that is not below the instance count.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InvalidOwnership {
    /// `METRIC_INSTANCES` is 0.
    #[error("METRIC_INSTANCES must be at least 1")]
    NoInstances,
    /// `METRIC_INSTANCE` is not below `METRIC_INSTANCES`.
    #[error("METRIC_INSTANCE is {instance}, but METRIC_INSTANCES is {instances} (instances are numbered 0 to {last})", last = instances - 1)]
    OutOfRange {
        /// The instance number.
        instance: u32,
        /// The instance count.
        instances: u32,
    },
    /// More instances than partitions: some would own nothing.
    #[error(
        "METRIC_INSTANCES is {instances}, more than PARTITIONS ({partitions}): instance {instance} would own no partition"
    )]
    Idle {
        /// The instance number.
        instance: u32,
        /// The instance count.
        instances: u32,
        /// The partition count.
        partitions: u32,
    },
}

impl Ownership {
    /// Instance `instance` of `instances`, checked against the partition count.
    pub fn new(
        instances: u32,
        instance: u32,
        partitions: Partitions,
    ) -> Result<Self, InvalidOwnership> {
        if instances == 0 {
            return Err(InvalidOwnership::NoInstances);
        }
        if instance >= instances {
            return Err(InvalidOwnership::OutOfRange {
                instance,
                instances,
            });
        }
        if instance >= partitions.count() {
            return Err(InvalidOwnership::Idle {
                instance,
                instances,
                partitions: partitions.count(),
            });
        }
        Ok(Self {
            instances,
            instance,
        })
    }

    /// The only instance: owns every partition.
    pub const SOLE: Self = Self {
        instances: 1,
        instance: 0,
    };

    /// Whether partition `k` is this instance's.
    pub fn owns(self, k: u32) -> bool {
        k % self.instances == self.instance
    }

    /// This instance's partitions, in order.
    pub fn owned(self, partitions: Partitions) -> Vec<u32> {
        partitions.all().filter(|k| self.owns(*k)).collect()
    }

    /// The instance number.
    pub fn instance(self) -> u32 {
        self.instance
    }

    /// The instance count.
    pub fn instances(self) -> u32 {
        self.instances
    }
}

/// The instance number in a host name ending in `-<n>`, as a Kubernetes StatefulSet names its
/// pods (`metric-2` → 2).
pub fn instance_from_hostname(hostname: &str) -> Option<u32> {
    let (_, number) = hostname.trim().rsplit_once('-')?;
    if number.is_empty() || !number.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    number.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn fnv1a64_matches_the_published_test_vectors() {
        // From the FNV reference (http://www.isthe.com/chongo/src/fnv/test_fnv.c); also in the
        // README so a producer in another language can check its routing.
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn ids_route_as_the_readme_says() {
        let four = Partitions::new(4).unwrap();
        let table: Vec<(&str, u64, u32)> = [
            "0",
            "1",
            "sample-42",
            "3f8e2b1c-5d4a-4e8f-9a7b-2c6d1e0f9a8b",
        ]
        .into_iter()
        .map(|id| (id, fnv1a64(id.as_bytes()), four.of(id)))
        .collect();
        assert_eq!(
            table,
            [
                ("0", 0xaf63_ad4c_8601_9caf, 3),
                ("1", 0xaf63_ac4c_8601_9afc, 0),
                ("sample-42", 0x28ac_8427_e030_1204, 0),
                (
                    "3f8e2b1c-5d4a-4e8f-9a7b-2c6d1e0f9a8b",
                    0x5927_946a_e16d_cfa0,
                    0
                ),
            ]
        );
        let eight = Partitions::new(8).unwrap();
        assert_eq!((eight.of("0"), eight.of("1")), (7, 4));
        // The table in docs/partitions.md.
        let table: Vec<(u32, u32)> = ["", "a", "foobar", "0", "1", "sample-42"]
            .into_iter()
            .map(|id| (four.of(id), eight.of(id)))
            .collect();
        assert_eq!(table, [(1, 5), (0, 4), (0, 0), (3, 7), (0, 4), (0, 4)]);
    }

    #[test]
    fn one_partition_keeps_todays_names_and_folders() {
        let one = Partitions::ONE;
        assert_eq!(one.queue("features", 0), "features");
        assert_eq!(one.queues("y_pred"), ["y_pred"]);
        assert_eq!(one.folder(Path::new("logs"), 0), Path::new("logs"));
        assert!(one.holds(0, "anything"));
        assert!(!one.is_partitioned());
    }

    #[test]
    fn partitioned_names_carry_the_partition() {
        let four = Partitions::new(4).unwrap();
        assert_eq!(
            four.queues("y_true"),
            ["y_true.p0", "y_true.p1", "y_true.p2", "y_true.p3"]
        );
        assert_eq!(four.folder(Path::new("logs"), 3), Path::new("logs/p3"));
        assert_eq!(marker_queue("features"), "features.partitions");
    }

    #[test]
    fn the_router_picks_the_queue_of_the_hash() {
        let router = Router::new("y_pred", Partitions::new(8).unwrap());
        assert_eq!(router.queue_for(Some("0")), "y_pred.p7");
        assert_eq!(router.queue_for(Some("1")), "y_pred.p4");
        assert_eq!(router.queue_for(None), "y_pred.p0");
        assert_eq!(router.queues().len(), 8);
        let one = Router::new("y_pred", Partitions::ONE);
        assert_eq!(one.queue_for(Some("0")), "y_pred");
    }

    #[test]
    fn counts_out_of_range_are_refused() {
        assert_eq!(Partitions::new(0), Err(InvalidPartitions(0)));
        assert!(Partitions::new(MAX_PARTITIONS).is_ok());
        assert!(Partitions::new(MAX_PARTITIONS + 1).is_err());
        assert!(
            InvalidPartitions(0).to_string().contains("PARTITIONS"),
            "the error names the setting"
        );
    }

    #[test]
    fn instances_own_every_partition_once() {
        let eight = Partitions::new(8).unwrap();
        let owned: Vec<Vec<u32>> = (0..3)
            .map(|i| Ownership::new(3, i, eight).unwrap().owned(eight))
            .collect();
        assert_eq!(owned, [vec![0, 3, 6], vec![1, 4, 7], vec![2, 5]]);
        assert_eq!(Ownership::SOLE.owned(eight), (0..8).collect::<Vec<_>>());
        assert_eq!(
            Ownership::new(2, 2, eight),
            Err(InvalidOwnership::OutOfRange {
                instance: 2,
                instances: 2
            })
        );
        assert_eq!(
            Ownership::new(0, 0, eight),
            Err(InvalidOwnership::NoInstances)
        );
        let two = Partitions::new(2).unwrap();
        let idle = Ownership::new(3, 2, two).unwrap_err();
        assert!(idle.to_string().contains("more than PARTITIONS"), "{idle}");
    }

    #[test]
    fn the_instance_comes_from_a_statefulset_pod_name() {
        assert_eq!(instance_from_hostname("metric-0"), Some(0));
        assert_eq!(instance_from_hostname("ml-pipeline-metric-12\n"), Some(12));
        assert_eq!(instance_from_hostname("metric"), None);
        assert_eq!(instance_from_hostname("metric-"), None);
        assert_eq!(instance_from_hostname("metric-a1"), None);
        assert_eq!(instance_from_hostname("3f2a9c1d7e6b"), None);
    }

    proptest! {
        /// Every id has exactly one partition, below the count, and the queue of that partition
        /// is one of the stream's queues.
        #[test]
        fn every_id_lives_in_exactly_one_partition(id in ".{0,40}", count in 1..64u32) {
            let partitions = Partitions::new(count).unwrap();
            let k = partitions.of(&id);
            prop_assert!(k < count);
            let holders: Vec<u32> = partitions.all().filter(|k| partitions.holds(*k, &id)).collect();
            prop_assert_eq!(holders, vec![k]);
            prop_assert!(partitions.queues("features").contains(&partitions.queue("features", k)));
        }

        /// Every partition is owned by exactly one instance.
        #[test]
        fn every_partition_has_one_owner(count in 1..64u32, instances in 1..16u32) {
            let partitions = Partitions::new(count).unwrap();
            let owners: Vec<Ownership> = (0..instances.min(count))
                .map(|i| Ownership::new(instances.min(count), i, partitions).unwrap())
                .collect();
            for k in partitions.all() {
                prop_assert_eq!(owners.iter().filter(|o| o.owns(k)).count(), 1);
            }
        }
    }
}
