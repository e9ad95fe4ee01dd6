"""text_encoder"""
