"""Statistics on calibration data: samples and their encoding (``data``), diagonal Fisher and input Gram matrices."""
