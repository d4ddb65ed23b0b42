// dynamicid modules: DynamicID's face prompts (the motion text fed to the IMR).
//
// The IMR reads a short "face prompt" describing expression and head pose,
// encoded by the CLIP text encoder. Two wordings exist:
//
//   inference (the released pipeline's automatic source prompt):
//       "in a {expression} expression, {pose}"
//       expression: the 7-way FER classifier's label (happy, surprise, sad,
//       anger, disgust, fear, neutral); pose: "facing up, " / "facing down, "
//       when the head is pitched, then "in front view" or "in side view":
//       "in a happy expression, facing up, in side view"
//   training (the VariFace-10k captions):
//       "the expression is {expression}, the face is {turn}"
//       expression: afraid, angry, disgusted, happy, neutral, sad, surprised;
//       turn: fully/slightly turned to the left/right, or front view:
//       "the expression is happy, the face is slightly turned to the left"
//
// The pose words of the inference prompt come from insightface's head pose,
// reported as [pitch, yaw, roll] in degrees: pitch > 10 is "facing up",
// pitch < -10 "facing down"; |yaw| < 10 is "in front view", otherwise "in side
// view". The released pipeline unpacks the pair as (yaw, pitch), i.e. with
// the names swapped, but then uses element 0 for up/down and element 1 for
// the view, which is the intended meaning; pose_from_angles takes the angles
// under their real names and pose_from_insightface takes the array in
// insightface's order, so both give the released words. A face that was not
// detected has pose (0, 0): "in front view".
//
//     using namespace dynamicid::modules::imr;
//     auto pose = pose_from_insightface({14.0f, -31.0f, 2.0f});      // facing up, side view
//     std::string p = inference_prompt(expression::happy, pose);     // "in a happy expression, facing up, in side view"
//     std::string t = training_prompt(expression::surprised, head_turn::slightly_left);
//     // "the expression is surprised, the face is slightly turned to the left"
//     std::string free = inference_prompt("very surprised", "front view");   // "in a very surprised expression, front view"
#pragma once

#include <dynamicid/core/error.hpp>

#include <array>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <span>
#include <string>
#include <string_view>

namespace dynamicid::modules::imr {

inline constexpr std::string_view face_prompt_component = "face_prompt";

/// The seven expressions of both wordings (FER's classes, KDEF's emotions).
enum class expression : std::uint8_t { neutral, happy, sad, surprised, angry, disgusted, afraid };

/// Head pitch as the inference prompt words it.
enum class vertical_pose : std::uint8_t { level, up, down };

/// Head yaw as the inference prompt words it.
enum class view : std::uint8_t { front, side };

/// The pose of an inference prompt; the default is a level, frontal face.
struct face_pose {
    vertical_pose vertical = vertical_pose::level;
    view facing = view::front;
    friend bool operator==(const face_pose&, const face_pose&) = default;
};

/// Head turn as the training captions word it.
enum class head_turn : std::uint8_t { fully_left, slightly_left, front, slightly_right, fully_right };

/// How the inference prompt names an expression.
enum class expression_wording : std::uint8_t {
    classifier,  ///< the FER label, as the released pipeline writes it ("surprise", "anger", "fear")
    adjective,   ///< the training captions' adjective ("surprised", "angry", "afraid")
};

/// The FER classifier's label: neutral, happy, sad, surprise, anger, disgust, fear.
constexpr std::string_view classifier_label(expression e) {
    constexpr std::array<std::string_view, 7> names{"neutral", "happy", "sad", "surprise", "anger", "disgust", "fear"};
    return names[static_cast<std::size_t>(e)];
}

/// The training captions' adjective: neutral, happy, sad, surprised, angry, disgusted, afraid.
constexpr std::string_view adjective(expression e) {
    constexpr std::array<std::string_view, 7> names{"neutral", "happy", "sad", "surprised", "angry", "disgusted", "afraid"};
    return names[static_cast<std::size_t>(e)];
}

/// The expression named by a classifier label or an adjective (lower case),
/// plus the spellings FER libraries use ("angry", "surprised" are already
/// adjectives; "fearful" is accepted too); nullopt otherwise.
inline std::optional<expression> parse_expression(std::string_view word) {
    for (int i = 0; i < 7; ++i) {
        const auto e = static_cast<expression>(i);
        if (word == classifier_label(e) || word == adjective(e)) return e;
    }
    if (word == "fearful") return expression::afraid;
    return std::nullopt;
}

/// The pose words: "facing up, in side view", "facing down, in front view", "in front view"...
inline std::string pose_words(face_pose pose) {
    std::string out;
    if (pose.vertical == vertical_pose::up) out = "facing up, ";
    else if (pose.vertical == vertical_pose::down) out = "facing down, ";
    out += pose.facing == view::front ? "in front view" : "in side view";
    return out;
}

/// The pose of a face whose head is pitched `pitch_degrees` (positive: up)
/// and turned `yaw_degrees`; the thresholds are the released ones (strict
/// 10 degrees for up/down, |yaw| < 10 for a front view). value_error for NaN.
inline face_pose pose_from_angles(double pitch_degrees, double yaw_degrees) {
    check(!std::isnan(pitch_degrees) && !std::isnan(yaw_degrees), face_prompt_component, "head pose angles must not be NaN");
    face_pose p;
    if (pitch_degrees > 10.0) p.vertical = vertical_pose::up;
    else if (pitch_degrees < -10.0) p.vertical = vertical_pose::down;
    p.facing = std::abs(yaw_degrees) < 10.0 ? view::front : view::side;
    return p;
}

/// The pose from insightface's `face.pose`, [pitch, yaw, roll] in degrees (roll is unused).
inline face_pose pose_from_insightface(std::span<const float> pitch_yaw_roll) {
    check(pitch_yaw_roll.size() >= 2, face_prompt_component, "insightface pose needs [pitch, yaw(, roll)], got ",
          pitch_yaw_roll.size(), " values");
    return pose_from_angles(pitch_yaw_roll[0], pitch_yaw_roll[1]);
}
inline face_pose pose_from_insightface(std::initializer_list<float> pitch_yaw_roll) {
    return pose_from_insightface(std::span<const float>(pitch_yaw_roll.begin(), pitch_yaw_roll.size()));
}

/// "in a {expression_text} expression, {pose_text}", from free text.
inline std::string inference_prompt(std::string_view expression_text, std::string_view pose_text) {
    std::string out = "in a ";
    out += expression_text;
    out += " expression, ";
    out += pose_text;
    return out;
}

/// The released automatic source prompt, e.g. "in a happy expression, facing up, in side view".
inline std::string inference_prompt(expression e, face_pose pose, expression_wording wording = expression_wording::classifier) {
    return inference_prompt(wording == expression_wording::classifier ? classifier_label(e) : adjective(e), pose_words(pose));
}

/// The training captions' pose words: "fully turned to the left", ..., "front view".
constexpr std::string_view turn_words(head_turn t) {
    constexpr std::array<std::string_view, 5> names{"fully turned to the left", "slightly turned to the left", "front view",
                                                    "slightly turned to the right", "fully turned to the right"};
    return names[static_cast<std::size_t>(t)];
}

/// "the expression is {expression_text}, the face is {turn_text}", from free text.
inline std::string training_prompt(std::string_view expression_text, std::string_view turn_text) {
    std::string out = "the expression is ";
    out += expression_text;
    out += ", the face is ";
    out += turn_text;
    return out;
}

/// A training caption, e.g. "the expression is happy, the face is slightly turned to the left".
inline std::string training_prompt(expression e, head_turn t) { return training_prompt(adjective(e), turn_words(t)); }

}  // namespace dynamicid::modules::imr
