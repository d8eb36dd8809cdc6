//! Remembers input hashes by (path, size, mtime, inode) so unchanged large
//! inputs are not rehashed on every plan. Content still decides: any change
//! of those stat fields rehashes.
