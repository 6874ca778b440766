//! Table `users`.

use crate::domain::{Email, Phone, Text};
use crate::views::UserView;
use chrono::{DateTime, Utc};
use sqlx::{FromRow, PgConnection};
use uuid::Uuid;

#[derive(Debug, Clone, FromRow)]
pub struct UserRow {
    pub id: Uuid,
    pub name: String,
    pub email: String,
    pub phone: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl UserRow {
    pub fn view(&self) -> UserView {
        UserView {
            id: self.id,
            name: self.name.clone(),
            email: self.email.clone(),
            phone: self.phone.clone(),
            created_at: self.created_at,
            updated_at: self.updated_at,
        }
    }
}

/// A validated new user.
#[derive(Debug, Clone)]
pub struct NewUser {
    pub name: Text,
    pub email: Email,
    pub phone: Phone,
}

pub async fn insert(conn: &mut PgConnection, id: Uuid, user: &NewUser) -> sqlx::Result<UserRow> {
    sqlx::query_as("INSERT INTO users (id, name, email, phone) VALUES ($1, $2, $3, $4) RETURNING *")
        .bind(id)
        .bind(user.name.as_str())
        .bind(user.email.as_str())
        .bind(user.phone.as_str())
        .fetch_one(conn)
        .await
}

pub async fn get(conn: &mut PgConnection, id: Uuid) -> sqlx::Result<Option<UserRow>> {
    sqlx::query_as("SELECT * FROM users WHERE id = $1")
        .bind(id)
        .fetch_optional(conn)
        .await
}

/// Whether the user exists; `FOR KEY SHARE` keeps it until commit.
pub async fn exists(conn: &mut PgConnection, id: Uuid) -> sqlx::Result<bool> {
    let row: Option<(Uuid,)> = sqlx::query_as("SELECT id FROM users WHERE id = $1 FOR KEY SHARE")
        .bind(id)
        .fetch_optional(conn)
        .await?;
    Ok(row.is_some())
}
