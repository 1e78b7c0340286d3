//! Application sandboxes: Linux namespaces, a private root, and cgroup limits.
