//! GLM decoder on candle.
