"""ssl-xcit: DINO self-supervised pretraining of XCiT vision transformers, and its evaluation."""
