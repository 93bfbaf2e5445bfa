"""Generated from containerd's API protos in proto/containerd/."""
