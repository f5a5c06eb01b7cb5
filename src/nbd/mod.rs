//! NBD protocol server. (To be written.)
