"""UniGeoSeg (Ni et al., 2025), clean-room: one module per component (issue 4, in progress).

Every component's parameter names follow the released checkpoint's state dict
(shared/reference/unigeoseg_official_state_dict.*.json) so that it loads strictly.
"""
