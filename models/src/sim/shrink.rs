//! Minimising a failing schedule: its steps' proptest value tree deletes steps in chunks and
//! then simplifies each, and [`shrink`] keeps every candidate that violates the same property.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::time::{Duration, Instant};

use proptest::strategy::ValueTree;

use super::check::Failure;
use super::schedule::{runner_for, Plan, Step};
use super::{Fnv, FuzzOptions, Schedule};

/// The value tree of a schedule. It shrinks as proptest's `VecValueTree` does, deleting steps
/// and then simplifying each one, but deletes in chunks first (halves, quarters, ... single
/// steps) so that a schedule of thousands of steps shrinks in a few thousand runs, and it can
/// cut everything after a step at once (a safety violation does not depend on later steps).
pub(super) struct ScheduleTree {
    elements: Vec<Box<dyn ValueTree<Value = Step>>>,
    included: Vec<bool>,
    phase: ShrinkPhase,
    last: Option<LastShrink>,
}

#[derive(Clone, Copy, Debug)]
enum ShrinkPhase {
    /// Delete `chunk` included steps starting at the `at`-th included one.
    Delete {
        chunk: usize,
        at: usize,
    },
    /// Simplify the element at this index.
    Simplify(usize),
    Done,
}

#[derive(Clone, Debug)]
enum LastShrink {
    Deleted(Vec<usize>),
    Simplified(usize),
}

impl ScheduleTree {
    pub(super) fn new(elements: Vec<Box<dyn ValueTree<Value = Step>>>) -> Self {
        let n = elements.len();
        Self {
            elements,
            included: vec![true; n],
            phase: ShrinkPhase::Delete {
                chunk: n.div_ceil(2).max(1),
                at: 0,
            },
            last: None,
        }
    }

    fn live(&self) -> Vec<usize> {
        (0..self.elements.len())
            .filter(|i| self.included[*i])
            .collect()
    }

    /// Drops every included step after the first `len`.
    pub(super) fn truncate(&mut self, len: usize) {
        for i in self.live().into_iter().skip(len) {
            self.included[i] = false;
        }
    }
}

impl ValueTree for ScheduleTree {
    type Value = Vec<Step>;

    fn current(&self) -> Vec<Step> {
        self.elements
            .iter()
            .zip(&self.included)
            .filter(|(_, included)| **included)
            .map(|(e, _)| e.current())
            .collect()
    }

    fn simplify(&mut self) -> bool {
        loop {
            match self.phase {
                ShrinkPhase::Delete { chunk, at } => {
                    let live = self.live();
                    if chunk == 0 || live.is_empty() {
                        self.phase = ShrinkPhase::Simplify(0);
                        continue;
                    }
                    if at >= live.len() {
                        self.phase = ShrinkPhase::Delete {
                            chunk: chunk / 2,
                            at: 0,
                        };
                        continue;
                    }
                    let removed: Vec<usize> = live[at..(at + chunk).min(live.len())].to_vec();
                    for i in &removed {
                        self.included[*i] = false;
                    }
                    self.last = Some(LastShrink::Deleted(removed));
                    return true;
                }
                ShrinkPhase::Simplify(ix) => {
                    if ix >= self.elements.len() {
                        self.phase = ShrinkPhase::Done;
                        return false;
                    }
                    if self.included[ix] && self.elements[ix].simplify() {
                        self.last = Some(LastShrink::Simplified(ix));
                        return true;
                    }
                    self.phase = ShrinkPhase::Simplify(ix + 1);
                }
                ShrinkPhase::Done => return false,
            }
        }
    }

    fn complicate(&mut self) -> bool {
        match self.last.take() {
            None => false,
            Some(LastShrink::Deleted(removed)) => {
                for i in &removed {
                    self.included[*i] = true;
                }
                // Keep these steps; try the next chunk.
                if let ShrinkPhase::Delete { chunk, at } = self.phase {
                    self.phase = ShrinkPhase::Delete {
                        chunk,
                        at: at + removed.len(),
                    };
                }
                true
            }
            Some(LastShrink::Simplified(ix)) if self.elements[ix].complicate() => {
                self.last = Some(LastShrink::Simplified(ix));
                true
            }
            Some(LastShrink::Simplified(_)) => false,
        }
    }
}

/// Shrinks a failing schedule with its proptest value tree, keeping candidates that violate the
/// same property, within `budget`. Returns the smallest, its failure, and how many runs it took.
pub(super) fn shrink(
    schedule: &Schedule,
    opts: &FuzzOptions,
    failure: Failure,
    budget: Duration,
) -> (Schedule, Failure, u64) {
    let deadline = Instant::now() + budget;
    let mut tree = Plan::new(schedule.seed, opts)
        .strategy()
        .tree(&mut runner_for(schedule.seed));
    let want = failure.property;
    let mut best = (schedule.clone(), failure);
    if tree.current() != schedule.steps {
        return (best.0, best.1, 0); // Not the schedule of its seed: no tree to shrink it with.
    }
    if let Some(step) = best.1.step {
        tree.truncate(step + 1);
        best.0.steps.truncate(step + 1);
    }
    let mut cache: HashMap<u64, Option<Failure>> = HashMap::new();
    let mut runs = 0u64;
    if !tree.simplify() {
        return (best.0, best.1, runs);
    }
    while Instant::now() < deadline {
        let candidate = Schedule {
            steps: tree.current(),
            ..schedule.clone()
        };
        let mut key = Fnv::default();
        candidate.steps.hash(&mut key);
        let verdict = cache
            .entry(key.finish())
            .or_insert_with(|| {
                runs += 1;
                candidate.run().err().filter(|f| f.property == want)
            })
            .clone();
        match verdict {
            Some(f) => {
                if let Some(step) = f.step {
                    tree.truncate(step + 1);
                }
                best = (
                    Schedule {
                        steps: tree.current(),
                        ..candidate
                    },
                    f,
                );
                if !tree.simplify() {
                    break;
                }
            }
            None => {
                if !tree.complicate() {
                    break;
                }
            }
        }
    }
    (best.0, best.1, runs)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests unwrap what they built to be valid.
mod tests {
    use super::*;
    use crate::sim::schedule::Plan;

    #[test]
    fn the_tree_deletes_in_chunks_then_simplifies() {
        let opts = FuzzOptions {
            executions: 4,
            steps_per_execution: 4,
            ..FuzzOptions::default()
        };
        let plan = Plan::new(3, &opts);
        let mut tree = plan.strategy().tree(&mut runner_for(3));
        let full = tree.current();
        assert!(full.len() >= 4);
        assert!(tree.simplify());
        assert_eq!(tree.current(), full[full.len().div_ceil(2)..].to_vec());
        assert!(tree.complicate());
        assert_eq!(tree.current(), full);
        // Accepting every deletion shrinks the schedule to nothing.
        while tree.simplify() {}
        assert!(tree.current().is_empty());
        let mut tree = plan.strategy().tree(&mut runner_for(3));
        tree.truncate(2);
        assert_eq!(tree.current(), full[..2].to_vec());
    }
}
