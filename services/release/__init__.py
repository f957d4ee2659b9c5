"""The release gate: a candidate version through tests, quantization, offline evaluation and
an A/B stage to production, or back out. So far its A/B verdict (``decision``)."""
