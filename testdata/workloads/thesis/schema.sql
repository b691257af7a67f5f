-- Schema of the thesis workload's database; rows are added by `scripts/lab workload up`.
CREATE DATABASE IF NOT EXISTS app;
CREATE TABLE IF NOT EXISTS app.users (
  id INT PRIMARY KEY,
  name VARCHAR(64) NOT NULL,
  email VARCHAR(128) NOT NULL,
  created_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP
);
-- For clients on other hosts (e.g. host c).
CREATE USER IF NOT EXISTS 'app'@'%' IDENTIFIED BY 'app';
GRANT ALL PRIVILEGES ON app.* TO 'app'@'%';
