//! bitsandbytes-compatible NF4 format.
