// dynamicid face: landmark crops, their decoding, and head pose.
//
// Landmark networks (2d106det, 1k3d68) see a square crop centred on the box,
// scaled so the box's longer side spans 2/3 of it; their outputs in [-1, 1]
// are mapped back through the crop's inverse transform, as insightface does.
// The pose is insightface's: a least-squares 3-D affine fit of a 68-point mean
// shape onto the 3-D landmarks, its rotation made orthonormal, and Euler
// angles (pitch, yaw, roll) in degrees.
//
//     auto m = dynamicid::face::landmark_transform(face.box, 192);
//     auto crop = dynamicid::face::warp_affine(photo, m, 192, 192);
//     auto pts = dynamicid::face::decode_landmarks(raw, m, 106, 192);
//     auto pose = dynamicid::face::estimate_pose(mean_shape, pts3d);
#pragma once

#include <dynamicid/face/geometry.hpp>

#include <array>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <numbers>
#include <sstream>
#include <string>
#include <vector>

namespace dynamicid::face {

/// The crop transform for a box (x1, y1, x2, y2): centre to the crop's centre,
/// scale size / (1.5 * longer side).
inline affine2d landmark_transform(const std::array<float, 4>& box, index_t size) {
    const double w = box[2] - box[0], h = box[3] - box[1];
    check<value_error>(w > 0 && h > 0 && std::isfinite(w) && std::isfinite(h), "face", "bad face box");
    const double cx = (box[2] + box[0]) / 2.0, cy = (box[3] + box[1]) / 2.0;
    const double s = static_cast<double>(size) / (std::max(w, h) * 1.5);
    return {{s, 0, -cx * s + size / 2.0, 0, s, -cy * s + size / 2.0}};
}

/// Landmarks in photo pixels: (count, 2) or, for outputs of >= 3000 values,
/// (count, 3) with depth scaled like x and y. The last `count` points are used.
inline std::vector<std::array<double, 3>> decode_landmarks(const std::vector<float>& raw, const affine2d& crop, std::size_t count,
                                                           index_t size) {
    const std::size_t dim = raw.size() >= 3000 ? 3 : 2;
    check<shape_error>(raw.size() % dim == 0 && raw.size() / dim >= count, "face", "landmark output of ", raw.size(),
                       " values cannot hold ", count, " points");
    const auto inv = crop.inverse();
    const double depth_scale = std::sqrt(inv.m[0] * inv.m[0] + inv.m[1] * inv.m[1]);
    const std::size_t first = raw.size() / dim - count;
    const double half = static_cast<double>(size / 2);
    std::vector<std::array<double, 3>> out(count);
    for (std::size_t i = 0; i < count; ++i) {
        const float* p = raw.data() + (first + i) * dim;
        // Single-precision steps like the float32 arrays of the reference.
        const float x = (p[0] + 1.0f) * static_cast<float>(half), y = (p[1] + 1.0f) * static_cast<float>(half);
        const auto q = inv.apply({x, y});
        out[i] = {q[0], q[1], dim == 3 ? static_cast<double>(p[2] * static_cast<float>(half)) * depth_scale : 0.0};
    }
    return out;
}

/// Head pose in degrees.
struct pose {
    double pitch = 0, yaw = 0, roll = 0;
};

/// Fits `mean_shape` (68 x 3) to `points` (68 x 3) and returns the Euler angles.
inline pose estimate_pose(const std::vector<std::array<double, 3>>& mean_shape, const std::vector<std::array<double, 3>>& points) {
    check<shape_error>(mean_shape.size() == points.size() && points.size() >= 4, "face", "pose needs matching point sets, got ",
                       mean_shape.size(), " and ", points.size());
    // Normal equations (X^T X) P^T = X^T Y with X = [mean | 1].
    double a[4][4] = {}, b[4][3] = {};
    for (std::size_t i = 0; i < points.size(); ++i) {
        const double x[4] = {mean_shape[i][0], mean_shape[i][1], mean_shape[i][2], 1.0};
        for (int r = 0; r < 4; ++r) {
            for (int c = 0; c < 4; ++c) a[r][c] += x[r] * x[c];
            for (int c = 0; c < 3; ++c) {
                check<value_error>(std::isfinite(points[i][static_cast<std::size_t>(c)]), "face", "non-finite landmark");
                b[r][c] += x[r] * points[i][static_cast<std::size_t>(c)];
            }
        }
    }
    for (int col = 0; col < 4; ++col) {  // Gauss-Jordan with partial pivoting
        int piv = col;
        for (int r = col + 1; r < 4; ++r)
            if (std::abs(a[r][col]) > std::abs(a[piv][col])) piv = r;
        check<value_error>(std::abs(a[piv][col]) > 1e-12, "face", "degenerate mean shape");
        std::swap(a[piv], a[col]);
        std::swap(b[piv], b[col]);
        for (int r = 0; r < 4; ++r) {
            if (r == col) continue;
            const double f = a[r][col] / a[col][col];
            for (int c = 0; c < 4; ++c) a[r][c] -= f * a[col][c];
            for (int c = 0; c < 3; ++c) b[r][c] -= f * b[col][c];
        }
    }
    double P[3][3];  // rows of the 3x3 linear part: P[row][k] = solution[k][row]
    for (int r = 0; r < 3; ++r)
        for (int k = 0; k < 3; ++k) P[r][k] = b[k][r] / a[k][k];
    auto norm = [](const double* v) { return std::sqrt(v[0] * v[0] + v[1] * v[1] + v[2] * v[2]); };
    const double n1 = norm(P[0]), n2 = norm(P[1]);
    check<value_error>(n1 > 0 && n2 > 0, "face", "degenerate landmark fit");
    double R[3][3];
    for (int k = 0; k < 3; ++k) {
        R[0][k] = P[0][k] / n1;
        R[1][k] = P[1][k] / n2;
    }
    R[2][0] = R[0][1] * R[1][2] - R[0][2] * R[1][1];
    R[2][1] = R[0][2] * R[1][0] - R[0][0] * R[1][2];
    R[2][2] = R[0][0] * R[1][1] - R[0][1] * R[1][0];
    const double sy = std::sqrt(R[0][0] * R[0][0] + R[1][0] * R[1][0]);
    double x, y, z;
    if (sy >= 1e-6) {
        x = std::atan2(R[2][1], R[2][2]);
        y = std::atan2(-R[2][0], sy);
        z = std::atan2(R[1][0], R[0][0]);
    } else {
        x = std::atan2(-R[1][2], R[1][1]);
        y = std::atan2(-R[2][0], sy);
        z = 0;
    }
    const double deg = 180.0 / std::numbers::pi;
    return {x * deg, y * deg, z * deg};
}

/// Reads a mean shape: whitespace-separated x y z rows, '#' comment lines.
inline std::vector<std::array<double, 3>> read_mean_shape(const std::filesystem::path& path) {
    std::ifstream in(path);
    check<io_error>(static_cast<bool>(in), "face", "cannot open mean shape '", path.string(), "'");
    std::vector<std::array<double, 3>> out;
    std::string line;
    while (std::getline(in, line)) {
        if (line.empty() || line[0] == '#') continue;
        std::istringstream row(line);
        std::array<double, 3> p{};
        check<io_error>(static_cast<bool>(row >> p[0] >> p[1] >> p[2]), "face", "'", path.string(), "': bad row '", line, "'");
        out.push_back(p);
        check<io_error>(out.size() <= 100000, "face", "'", path.string(), "': too many rows");
    }
    check<io_error>(out.size() == 68, "face", "'", path.string(), "' has ", out.size(), " points, expected 68");
    return out;
}

}  // namespace dynamicid::face
