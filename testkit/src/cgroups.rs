//! What a test that needs cgroups asserts first.

use sand_sandbox::{cgroup_support, CgroupSupport};

/// Fails the test, saying why, unless this host gives sandboxes a usable cgroup (root, and a
/// cgroup v2 or v1 memory hierarchy): tests of limits fail without one, never skip.
pub fn assert_usable() {
    let support = cgroup_support();
    assert!(
        !matches!(support, CgroupSupport::Unavailable { .. }),
        "these tests need cgroups: {support}"
    );
}
