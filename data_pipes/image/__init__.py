"""Images: `decode` turns sample bytes into RGB arrays (fused with the crop geometry); `augment` builds the
train/eval transforms of the `conf/aug` recipes."""
