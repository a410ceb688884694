//! The de-duplication window of the join: the ids joined most recently, as 128-bit
//! fingerprints with their values' prints, in generations dropped whole.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash as _, Hasher as _};

/// What is remembered of a joined id: its values' prints ([`Value::print`]: a number's own bits)
/// and a hash of its model version; with its key, 40 bytes a remembered id.
#[derive(Debug, Clone, Copy)]
pub(super) struct Joined {
    pub(super) y_true: u64,
    pub(super) y_pred: u64,
    pub(super) version: u32,
    /// Whether the prints are of classes (else of numbers), for the conflict's message.
    pub(super) classes: bool,
}

/// The key of a remembered id: its 128-bit fingerprint as two halves (8-byte aligned, where a
/// `u128` would pad every entry to 48 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct JoinedKey(u64, u64);

impl std::hash::Hash for JoinedKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // Already a keyed hash: one word of it is the table's hash.
        state.write_u64(self.0);
    }
}

/// The hasher of [`JoinedKey`]: passes its word through.
#[derive(Debug, Default, Clone, Copy)]
struct PassThrough(u64);

impl std::hash::Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write_u64(&mut self, word: u64) {
        self.0 = word;
    }
    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*byte);
        }
    }
}

type Generation = HashMap<JoinedKey, Joined, std::hash::BuildHasherDefault<PassThrough>>;

pub(super) fn joined_key(id: &str) -> JoinedKey {
    let print = fingerprint(id);
    JoinedKey((print >> 64) as u64, print as u64)
}

/// The ids joined most recently, in generations of an eighth of the capacity, each allocated
/// once at its full size: the oldest generation is dropped whole when the others hold the
/// capacity. So at most an eighth more than the capacity is held, and memory does not grow
/// beyond that however long the service runs (removing single entries would leave tombstones
/// that make the table double).
#[derive(Debug)]
pub(super) struct JoinedIds {
    generations: VecDeque<Generation>,
    capacity: usize,
}

impl JoinedIds {
    pub(super) fn new(capacity: usize) -> Self {
        Self {
            generations: VecDeque::new(),
            capacity,
        }
    }

    fn generation_size(&self) -> usize {
        (self.capacity / 8).max(1)
    }

    pub(super) fn len(&self) -> usize {
        self.generations.iter().map(HashMap::len).sum()
    }

    pub(super) fn get(&self, key: &JoinedKey) -> Option<&Joined> {
        self.generations.iter().rev().find_map(|g| g.get(key))
    }

    /// Remembers `key` with `joined` (replacing what was remembered of it).
    pub(super) fn insert(&mut self, key: JoinedKey, joined: Joined) {
        if let Some(known) = self.generations.iter_mut().find_map(|g| g.get_mut(&key)) {
            *known = joined;
            return;
        }
        let size = self.generation_size();
        if self.generations.back().is_none_or(|g| g.len() >= size) {
            self.generations
                .push_back(Generation::with_capacity_and_hasher(
                    size,
                    Default::default(),
                ));
        }
        if let Some(newest) = self.generations.back_mut() {
            newest.insert(key, joined);
        }
        self.forget_beyond_capacity();
    }

    pub(super) fn set_capacity(&mut self, capacity: usize) {
        self.capacity = capacity;
        self.forget_beyond_capacity();
    }

    /// Drops the oldest generations while the newer ones hold the capacity.
    fn forget_beyond_capacity(&mut self) {
        let mut held = self.len();
        while let Some(oldest) = self.generations.front() {
            if self.generations.len() == 1 || held - oldest.len() < self.capacity {
                break;
            }
            held -= oldest.len();
            self.generations.pop_front();
        }
    }
}

/// 128-bit fingerprint of an id: two keyed SipHash runs. A false "already joined" needs a
/// collision among the remembered ids, about 1 in 10²⁶ for a million of them.
pub fn fingerprint(id: &str) -> u128 {
    let half = |salt: u8| {
        let mut hasher = DefaultHasher::new();
        salt.hash(&mut hasher);
        id.hash(&mut hasher);
        hasher.finish()
    };
    (u128::from(half(1)) << 64) | u128::from(half(2))
}
