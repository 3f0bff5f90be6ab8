"""The dual-path network: a ResNet image branch, a deep text CNN, one shared instance classifier."""
